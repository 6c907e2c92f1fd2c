"""Paged decode attention: every decode token's query heads over its sequence's cached K/V, read
through the sequence's block table, in one launch (reference: ``reference.paged_decode_attention``).

One program per (sequence, kv head) holds the G = H / Hkv query heads that share that kv head (GQA)
as the rows of one tensor-core tile, walks the context in tiles of BLOCK_N positions (each a
gather of whole cache blocks by the block table), and keeps the softmax online (running max and
sum in float32; the probabilities go to the second product in the caches' dtype, as flash
attention does). Few (sequence, kv head) pairs leave SMs idle, so the context can also be shared out
over several programs per pair whose parts a second launch adds up (flash-decoding: ``splits``).
Everything it reads is in device memory (the context lengths too), and the grid depends only on
the batch's shapes: a decode step can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltahub.errors import ShapeMismatchError

from ._common import check_device, interpreting, n_sms, next_pow2


@triton.jit
def _paged_decode_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    len_ptr,
    out_ptr,
    ws_ptr,
    scale,
    window,
    s_qd,
    s_qh,
    s_kb,
    s_kt,
    s_kh,
    s_vb,
    s_vt,
    s_vh,
    s_bt,
    s_od,
    s_oh,
    G: tl.constexpr,
    G_P: tl.constexpr,
    DH: tl.constexpr,
    DH_P: tl.constexpr,
    BS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    WINDOW: tl.constexpr,
    SPLIT: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    """Program (d, kh, split): out[d, kh G + g] for g < G. Positions lo <= p < context_lens[d], lo
    0 or (WINDOW) context_lens[d] - window, in tiles of BLOCK_N from lo's tile on; with SPLIT, the
    tiles are shared out over the grid's third axis and each program writes its unnormalised part
    to ws (``_combine_kernel`` adds them up): [D, H, splits, DH + 2] float32 (acc, max, sum)."""
    d = tl.program_id(0).to(tl.int64)
    kh = tl.program_id(1)
    n_ctx = tl.load(len_ptr + d).to(tl.int32)
    lo = 0
    if WINDOW:
        lo = tl.maximum(n_ctx - window, 0)
    first = lo - lo % BLOCK_N
    end = n_ctx
    if SPLIT:  # this program's share of the tiles (none for some when the context is short)
        per = tl.cdiv(tl.cdiv(n_ctx - first, BLOCK_N), tl.num_programs(2))
        first += tl.program_id(2) * per * BLOCK_N
        end = tl.minimum(first + per * BLOCK_N, n_ctx)
    offs_g = tl.arange(0, G_P)
    offs_d = tl.arange(0, DH_P)
    g_ok = offs_g < G
    d_ok = offs_d < DH
    heads = kh * G + offs_g
    q_ok = g_ok[:, None] & d_ok[None, :]
    q = tl.load(q_ptr + d * s_qd + heads[:, None] * s_qh + offs_d[None, :], mask=q_ok, other=0.0)
    m_i = tl.full((G_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_P,), tl.float32)
    acc = tl.zeros((G_P, DH_P), tl.float32)
    for n0 in range(first, end, BLOCK_N):
        pos = n0 + tl.arange(0, BLOCK_N)
        live = (pos >= lo) & (pos < n_ctx)
        blk = tl.load(bt_ptr + d * s_bt + pos // BS, mask=live, other=0).to(tl.int64)
        k_rows = blk * s_kb + (pos % BS) * s_kt + kh * s_kh
        v_rows = blk * s_vb + (pos % BS) * s_vt + kh * s_vh
        kv_ok = live[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_rows[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)  # [BLOCK_N, DH_P]
        v = tl.load(v_ptr + v_rows[:, None] + offs_d[None, :], mask=kv_ok, other=0.0)
        if F32_DOT:  # Triton's interpreter multiplies bf16 tiles as raw integers: widen them first
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32))) * scale
        else:
            s = tl.dot(q, tl.trans(k)) * scale  # [G_P, BLOCK_N] float32
        s = tl.where(live[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: every tile run holds a live position
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if F32_DOT:
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32))
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new
    if SPLIT:
        row = (d * (tl.num_programs(1) * G) + heads) * tl.num_programs(2) + tl.program_id(2)
        w_ptrs = ws_ptr + row * (DH + 2)
        tl.store(w_ptrs[:, None] + offs_d[None, :], acc, mask=q_ok)
        tl.store(w_ptrs + DH, m_i, mask=g_ok)
        tl.store(w_ptrs + DH + 1, l_i, mask=g_ok)
    else:
        out = acc / l_i[:, None]
        o_ptrs = out_ptr + d * s_od + heads[:, None] * s_oh + offs_d[None, :]
        tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=q_ok)


@triton.jit
def _combine_kernel(ws_ptr, out_ptr, n_split, s_od, s_oh, DH: tl.constexpr, DH_P: tl.constexpr,
                    S_P: tl.constexpr):  # fmt: skip
    """Program (d, h): out[d, h] from the splits' parts in ws (a split that ran no tile has max
    -inf and sum 0, so its weight is 0)."""
    d = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    offs_s = tl.arange(0, S_P)
    offs_d = tl.arange(0, DH_P)
    s_ok = offs_s < n_split
    rows = ws_ptr + ((d * tl.num_programs(1) + h) * n_split + offs_s) * (DH + 2)
    m = tl.load(rows + DH, mask=s_ok, other=float("-inf"))
    l = tl.load(rows + DH + 1, mask=s_ok, other=0.0)
    acc = tl.load(rows[:, None] + offs_d[None, :], mask=s_ok[:, None] & (offs_d < DH)[None, :], other=0.0)
    w = tl.exp(m - tl.max(m, 0))
    out = tl.sum(w[:, None] * acc, 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + d * s_od + h * s_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=offs_d < DH)


def _block_n(dh: int) -> int:
    """Context positions per tile."""
    return 64 if dh <= 128 else 32


def auto_splits(nd: int, hkv: int, dh: int, reach: int, window: int | None, device: torch.device) -> int:
    """Programs per (sequence, kv head) for ``nd`` decodes whose block tables hold up to ``reach``
    positions: about 2 programs per SM, at most one per tile of the context (or window), at most 32."""
    if window is not None:
        reach = min(reach, window + _block_n(dh))
    return max(1, min(triton.cdiv(2 * n_sms(device), nd * hkv), triton.cdiv(reach, _block_n(dh)), 32))


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
    *,
    splits: int | None = None,
) -> torch.Tensor:
    """Semantics: out[d, h] = softmax_p(scale q[d, h] · K_d[p]) · V_d[p] over the cached positions
    p < context_lens[d] (and p >= context_lens[d] - window), K_d[p] = k_cache[block_tables[d,
    p // block_size], p % block_size, h // (H / Hkv)] (V likewise).

    Shape: q [D, H, Dh] fp16/bf16; k_cache, v_cache [blocks, block_size, Hkv, Dh] in q's dtype;
    block_tables [D, max_blocks] int32/int64; context_lens [D] int (each >= 1). Returns [D, H, Dh].
    ``splits``: programs per (sequence, kv head), each a share of the context, whose parts a second
    launch adds up (flash-decoding); None: enough to give the GPU ~2 programs per SM, from the
    shapes alone (the widest context the block tables can hold), so a CUDA graph keeps it.
    """
    if q.dim() != 3 or q.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeMismatchError(f"q must be fp16/bf16 [D, H, Dh], got {q.dtype} {tuple(q.shape)}")
    nd, h, dh = q.shape
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or k_cache.dtype != q.dtype:
        raise ShapeMismatchError(
            f"caches must be {q.dtype} [blocks, block_size, Hkv, {dh}] alike, got "
            f"{k_cache.dtype} {tuple(k_cache.shape)} and {v_cache.dtype} {tuple(v_cache.shape)}"
        )
    bs, hkv = k_cache.shape[1], k_cache.shape[2]
    if k_cache.shape[3] != dh or h % hkv:
        raise ShapeMismatchError(
            f"q [D, {h}, {dh}] does not fit caches with {hkv} kv heads of {k_cache.shape[3]}"
        )
    if block_tables.dim() != 2 or block_tables.shape[0] != nd or context_lens.shape != (nd,):
        raise ShapeMismatchError(
            f"block_tables must be [{nd}, max_blocks] and context_lens [{nd}], got "
            f"{tuple(block_tables.shape)} and {tuple(context_lens.shape)}"
        )
    check_device(q, k_cache, v_cache, block_tables, context_lens)
    if k_cache.stride(3) != 1 or v_cache.stride(3) != 1:
        raise ShapeMismatchError("the caches' last dim must be contiguous")
    if window is not None and window < 1:
        raise ShapeMismatchError(f"window must be >= 1 position, got {window}")
    q = q if q.stride(2) == 1 else q.contiguous()
    block_tables, context_lens = block_tables.contiguous(), context_lens.contiguous()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if nd == 0:
        return out
    g, block_n = h // hkv, _block_n(dh)
    if splits is None:
        splits = auto_splits(nd, hkv, dh, block_tables.shape[1] * bs, window, q.device)
    splits = max(1, int(splits))
    # the splits' parts (acc, max, sum per head); unused without a split (out stands in)
    ws = torch.empty(nd, h, splits, dh + 2, dtype=torch.float32, device=q.device) if splits > 1 else out
    dh_p = max(16, next_pow2(dh))
    _paged_decode_kernel[(nd, hkv, splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, ws, float(scale), int(window or 0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0),
        out.stride(0), out.stride(1),
        G=g, G_P=max(16, next_pow2(g)), DH=dh, DH_P=dh_p, BS=bs, BLOCK_N=block_n,
        WINDOW=window is not None, SPLIT=splits > 1, F32_DOT=interpreting(), num_warps=4,
    )  # fmt: skip
    if splits > 1:
        _combine_kernel[(nd, h)](ws, out, splits, out.stride(0), out.stride(1), DH=dh, DH_P=dh_p,
                                 S_P=next_pow2(splits), num_warps=4)  # fmt: skip
    return out

"""Float32 torch semantics of every kernel op: the tests' oracle and the CPU serving path.

Each op loops over the *slots present in the batch* (never over tokens) and dequantizes a slot's
delta with deltahub.format, so the result is the format's own definition of Δ.
"""

from __future__ import annotations

import torch

from deltahub.errors import ShapeMismatchError
from deltahub.format import PackedTensor, QuantLayout, dequantize


def _layout(bits: int, sparse: bool, group_size: int | None) -> QuantLayout:
    return QuantLayout(bits=bits, sparsity="2:4" if sparse else "none", group_size=group_size)


def _slot_parts(s: int, rows: torch.Tensor | slice, **parts: torch.Tensor | None) -> dict[str, torch.Tensor]:
    return {name: t[s][rows] for name, t in parts.items() if t is not None}


def dequant_slot(
    s: int,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    *,
    bits: int,
    sparse: bool,
    group_size: int | None,
    k: int,
    meta: torch.Tensor | None = None,
    qweight_hi: torch.Tensor | None = None,
    rows: torch.Tensor | slice | None = None,
) -> torch.Tensor:
    """Δ of slot ``s`` (optionally only ``rows``) as float32 [n_rows, k]."""
    rows = slice(None) if rows is None else rows
    parts = _slot_parts(s, rows, qweight=qweight, scales=scales, meta=meta, qweight_hi=qweight_hi)
    n = parts["qweight"].shape[0]
    packed = PackedTensor("qlinear", (n, k), parts, layout=_layout(bits, sparse, group_size))
    return dequantize(packed)


def _present_slots(slot: torch.Tensor, n_slots: int) -> list[int]:
    if slot.dim() != 1:
        raise ShapeMismatchError(f"slot must be 1-D, got shape {tuple(slot.shape)}")
    present = torch.unique(slot[slot >= 0]).tolist()
    if present and present[-1] >= n_slots:
        raise ShapeMismatchError(f"slot index {present[-1]} out of range for {n_slots} stacked slots")
    return present


def _out(out: torch.Tensor | None, t: int, n: int, like: torch.Tensor) -> torch.Tensor:
    if out is None:
        return torch.zeros(t, n, dtype=like.dtype, device=like.device)
    if tuple(out.shape) != (t, n):
        raise ShapeMismatchError(f"out must have shape {(t, n)}, got {tuple(out.shape)}")
    return out


def sbmm(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    slot: torch.Tensor,
    *,
    bits: int,
    sparse: bool,
    group_size: int | None,
    k: int,
    meta: torch.Tensor | None = None,
    qweight_hi: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with slot[t] >= 0.

    Shape: x [T, k]; qweight [S, N, Wq]; scales [S, N, G]; meta [S, N, Wm]; qweight_hi [S, N, Wh];
    slot [T]; out [T, N] (same dtype as x). Computed in float32, added in out's dtype.
    """
    t, n = x.shape[0], qweight.shape[1]
    if x.dim() != 2 or x.shape[1] != k:
        raise ShapeMismatchError(f"x must be [T, {k}], got {tuple(x.shape)}")
    out = _out(out, t, n, x)
    for s in _present_slots(slot, qweight.shape[0]):
        idx = (slot == s).nonzero().squeeze(1)
        delta = dequant_slot(
            s,
            qweight,
            scales,
            bits=bits,
            sparse=sparse,
            group_size=group_size,
            k=k,
            meta=meta,
            qweight_hi=qweight_hi,
        )
        y = x[idx].to(torch.float32) @ delta.T
        out[idx] = (out[idx].to(torch.float32) + y).to(out.dtype)
    return out


def sbmm_device(
    x: torch.Tensor,
    dw: torch.Tensor,
    scales: torch.Tensor,
    slot: torch.Tensor,
    *,
    bits: int,
    group_size: int | None,
    k: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sbmm`` on deltas in the GPU slot layout (kernels/layout.py), read back to the packed parts."""
    from .layout import from_device_layout

    lay = _layout(bits, True, group_size)
    parts = from_device_layout({"dw": dw, "scales": scales}, lay, dw.shape[1], k)
    kw = dict(bits=bits, sparse=True, group_size=group_size, k=k, meta=parts["meta"], out=out)
    return sbmm(x, parts["qweight"], scales, slot, **kw)


def sgmv(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: out[t] += scale[slot[t]] * (x[t] @ lora_a[slot[t]]ᵀ) @ lora_b[slot[t]]ᵀ (slot >= 0).

    Shape: x [T, K]; lora_a [S, r, K]; lora_b [S, N, r]; scale [S] or None (= 1); slot [T];
    out [T, N] (same dtype as x).
    """
    t, n = x.shape[0], lora_b.shape[1]
    if lora_a.shape[2] != x.shape[1] or lora_b.shape[2] != lora_a.shape[1]:
        raise ShapeMismatchError(
            f"LoRA shapes do not chain: x {tuple(x.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
        )
    out = _out(out, t, n, x)
    for s in _present_slots(slot, lora_a.shape[0]):
        idx = (slot == s).nonzero().squeeze(1)
        h = x[idx].to(torch.float32) @ lora_a[s].to(torch.float32).T
        y = h @ lora_b[s].to(torch.float32).T
        if scale is not None:
            y = y * scale[s].to(torch.float32)
        out[idx] = (out[idx].to(torch.float32) + y).to(out.dtype)
    return out


def embedding_delta(
    ids: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    slot: torch.Tensor,
    *,
    bits: int,
    sparse: bool,
    group_size: int | None,
    k: int,
    meta: torch.Tensor | None = None,
    qweight_hi: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: out[t] = dequant(Δ[slot[t]])[ids[t]] (zeros where slot[t] < 0).

    Shape: ids [T]; qweight [S, V, Wq] (the embedding's delta, V rows); slot [T] -> out [T, k] fp32.
    Only the rows looked up are dequantized.
    """
    if ids.shape != slot.shape:
        raise ShapeMismatchError(f"ids {tuple(ids.shape)} and slot {tuple(slot.shape)} differ")
    out = torch.zeros(ids.shape[0], k, dtype=torch.float32, device=ids.device)
    for s in _present_slots(slot, qweight.shape[0]):
        idx = (slot == s).nonzero().squeeze(1)
        out[idx] = dequant_slot(
            s,
            qweight,
            scales,
            bits=bits,
            sparse=sparse,
            group_size=group_size,
            k=k,
            meta=meta,
            qweight_hi=qweight_hi,
            rows=ids[idx].long(),
        )
    return out


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    permute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantics of ``norm_act.rms_norm``: the norm in float32 rounded to x's dtype, times
    (weight + delta[slot]) computed in float32 and rounded to x's dtype (weight where delta is None).
    Shape: x [T, K]; weight [K]; delta [S + 1, K] float32; slot [T] -> (y [T, K], permuted or None)."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    w = weight if delta is None else (weight.float() + delta[slot]).to(x.dtype)
    y = w * h
    return y, _permuted(y, permute)


ACTS = {
    "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu,
    "gelu_tanh": lambda g: torch.nn.functional.gelu(g, approximate="tanh"),
}


def act_mul(
    g: torch.Tensor, u: torch.Tensor, act: str, *, permute: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantics of ``norm_act.act_mul``: act(g) in g's dtype, times u. Shape: g, u [T, N] ->
    (h [T, N], permuted or None)."""
    h = ACTS[act](g) * u
    return h, _permuted(h, permute)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """Semantics of ``attention.paged_decode_attention``, in float32: each decode token's heads
    over its sequence's cached positions p < context_lens[d] (and p >= context_lens[d] - window),
    rows block_tables[d, p // block_size] of the caches, kv head h // (H / Hkv).
    Shape: q [D, H, Dh]; caches [blocks, block_size, Hkv, Dh]; block_tables [D, max_blocks] int;
    context_lens [D] -> [D, H, Dh] in q's dtype."""
    nd, h, dh = q.shape
    hkv = k_cache.shape[2]
    g = h // hkv
    k = k_cache[block_tables.long()].reshape(nd, -1, hkv, dh).float()  # [D, L, Hkv, Dh]
    v = v_cache[block_tables.long()].reshape(nd, -1, hkv, dh).float()
    qf = q.float().view(nd, hkv, g, dh)
    scores = torch.einsum("bkgd,blkd->bkgl", qf, k) * scale
    pos = torch.arange(k.shape[1], device=q.device)
    mask = pos.unsqueeze(0) >= context_lens.unsqueeze(1)  # [D, L]
    if window is not None:
        mask |= pos.unsqueeze(0) <= context_lens.unsqueeze(1) - 1 - window
    scores = scores.masked_fill(mask[:, None, None, :], float("-inf"))
    out = torch.einsum("bkgl,blkd->bkgd", torch.softmax(scores, dim=-1), v)
    return out.reshape(nd, h, dh).to(q.dtype)


def _permuted(y: torch.Tensor, permute: bool) -> torch.Tensor | None:
    from .layout import permute_x_torch

    return permute_x_torch(y, y.shape[1]) if permute else None


def _two_of_four(saliency: torch.Tensor) -> torch.Tensor:
    """[n, M] -> bool mask keeping the 2 largest of every 4 (ties: the lower index), as the kernel."""
    s = saliency.reshape(saliency.shape[0], -1, 4)
    idx = torch.arange(4, device=s.device)
    a, b = s.unsqueeze(-1), s.unsqueeze(-2)  # [n, g, j, 1] vs [n, g, 1, k]: does k beat j?
    beats = (b > a) | ((b == a) & (idx < idx.unsqueeze(-1)))
    return (beats.sum(-1) < 2).reshape(saliency.shape)


def obs_block(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, *, bits: int, sparse: bool,
              codes: torch.Tensor | None = None, keep: torch.Tensor | None = None,
              err: torch.Tensor | None = None, fixed_mask: bool = False):
    """One lazy block of the OBS column loop (Semantics/Shape: kernels/obs_block_triton.py).
    w [n, B] float32 (not modified), u [B, B], scale [n] -> (codes uint8, keep bool or None, err)."""
    from deltahub.codecs.base import fake_quant

    n, b = w.shape
    codes = torch.empty(n, b, dtype=torch.uint8, device=w.device) if codes is None else codes
    if fixed_mask and (not sparse or keep is None):
        raise ShapeMismatchError("fixed_mask needs sparse=True and the mask in keep")
    if sparse and keep is None:
        keep = torch.empty(n, b, dtype=torch.bool, device=w.device)
    err = torch.empty(n, b, dtype=torch.float32, device=w.device) if err is None else err
    w1 = w.clone()
    d1 = torch.diagonal(u)
    for i in range(b):
        if sparse and not fixed_mask and i % 4 == 0:
            keep[:, i : i + 4] = _two_of_four(w1[:, i : i + 4].square() / d1[i : i + 4].square())
        x = w1[:, i]
        c, q = fake_quant(x, scale, bits)
        if sparse:
            q = q * keep[:, i]
        codes[:, i] = c
        e = (x - q) / d1[i]
        w1[:, i:].addr_(e, u[i, i:], alpha=-1)
        err[:, i] = e
    return codes, (keep if sparse else None), err

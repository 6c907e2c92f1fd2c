"""SGMV: LoRA adapters of many slots applied in two grouped launches (shrink, expand).

Semantics: out[t] += scale[slot[t]] * (x[t] @ lora_a[slot[t]]ᵀ) @ lora_b[slot[t]]ᵀ for slot[t] >= 0.

Tokens are grouped by slot as in SBMM (``_common.plan``). Shrink: programs (K split, work item)
write fp32 partial products h[split, t, :r]; expand: programs (output block, work item) sum the
splits, multiply by the slot's B on the tensor cores and add into out. Ranks are padded to a power
of two >= 16 inside the kernels (masked), so any rank works; 8-128 is the intended range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltahub.errors import ShapeMismatchError

from ._common import Plan, check_device, check_plan, forward_calls, interpreting, next_pow2, plan
from .dequant_triton import _work_item


@triton.jit
def _shrink_kernel(
    x_ptr,
    a_ptr,
    h_ptr,
    order_ptr,
    seg_ptr,
    T,
    K,
    R,
    S,
    k_per_split,
    s_xt,
    s_xk,
    s_as,
    s_ar,
    s_ak,
    S_P2: tl.constexpr,
    RP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    s, tok, m_mask, n_work = _work_item(seg_ptr, order_ptr, S, S_P2, BLOCK_M)
    if tl.program_id(1) >= n_work:
        return
    split = tl.program_id(0)
    offs_r = tl.arange(0, RP)
    r_mask = offs_r < R
    a_rows = a_ptr + s.to(tl.int64) * s_as + offs_r * s_ar
    acc = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    k_lo = split * k_per_split
    for k0 in range(k_lo, k_lo + k_per_split, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        xt = tl.load(
            x_ptr + tok[:, None] * s_xt + offs_k[None, :] * s_xk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        at = tl.load(
            a_rows[None, :] + offs_k[:, None] * s_ak, mask=r_mask[None, :] & k_mask[:, None], other=0.0
        )
        if IEEE:
            acc += tl.dot(xt.to(tl.float32), at.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(xt, at.to(xt.dtype))
    h_ptrs = h_ptr + (split * T + tok[:, None]).to(tl.int64) * RP + offs_r[None, :]
    tl.store(h_ptrs, acc, mask=m_mask[:, None])


@triton.jit
def _expand_kernel(
    h_ptr,
    b_ptr,
    scale_ptr,
    out_ptr,
    order_ptr,
    seg_ptr,
    T,
    N,
    R,
    S,
    n_split,
    s_bs,
    s_bn,
    s_br,
    s_ot,
    s_on,
    S_P2: tl.constexpr,
    RP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    IEEE: tl.constexpr,
):
    s, tok, m_mask, n_work = _work_item(seg_ptr, order_ptr, S, S_P2, BLOCK_M)
    if tl.program_id(1) >= n_work:
        return
    offs_r = tl.arange(0, RP)
    h = tl.zeros((BLOCK_M, RP), dtype=tl.float32)
    for split in range(0, n_split):
        h += tl.load(
            h_ptr + (split * T + tok[:, None]).to(tl.int64) * RP + offs_r[None, :],
            mask=m_mask[:, None],
            other=0.0,
        )
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    bt = tl.load(
        b_ptr + s.to(tl.int64) * s_bs + offs_n[None, :] * s_bn + offs_r[:, None] * s_br,
        mask=n_mask[None, :] & (offs_r < R)[:, None],
        other=0.0,
    )
    if IEEE:
        acc = tl.dot(h, bt.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(h.to(out_ptr.dtype.element_ty), bt.to(out_ptr.dtype.element_ty))
    if HAS_SCALE:
        acc = acc * tl.load(scale_ptr + s)
    o_ptrs = out_ptr + tok[:, None] * s_ot + offs_n[None, :] * s_on
    o_mask = m_mask[:, None] & n_mask[None, :]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def sgmv(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    slot: torch.Tensor,
    *,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    plan_: Plan | None = None,
) -> torch.Tensor:
    """Semantics: out[t] += scale[slot[t]] * (x[t] @ lora_a[slot[t]]ᵀ) @ lora_b[slot[t]]ᵀ (0 <= slot[t] < S).

    Shape: x [T, K] fp16/bf16/fp32; lora_a [S, r, K]; lora_b [S, N, r]; scale [S] fp32 or None;
    slot [T] int32; out [T, N] in x's dtype (zeros if None). ``plan_``: a precomputed plan(slot, S).
    """
    if x.dim() != 2 or lora_a.dim() != 3 or lora_b.dim() != 3:
        raise ShapeMismatchError("x must be [T, K], lora_a [S, r, K], lora_b [S, N, r]")
    t, k = x.shape
    n_slots, r, _ = lora_a.shape
    n = lora_b.shape[1]
    if lora_a.shape[2] != k or lora_b.shape[0] != n_slots or lora_b.shape[2] != r:
        raise ShapeMismatchError(
            f"LoRA shapes do not chain: x {tuple(x.shape)}, A {tuple(lora_a.shape)}, B {tuple(lora_b.shape)}"
        )
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if slot.shape != (t,):
        raise ShapeMismatchError(f"slot must be [{t}], got {tuple(slot.shape)}")
    if scale is not None and scale.shape != (n_slots,):
        raise ShapeMismatchError(f"scale must be [{n_slots}], got {tuple(scale.shape)}")
    if out is None:
        out = torch.zeros(t, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (t, n) or out.dtype != x.dtype:
        raise ShapeMismatchError(f"out must be {x.dtype} [{t}, {n}], got {out.dtype} {tuple(out.shape)}")
    check_device(*[v for v in (x, lora_a, lora_b, slot, scale, out) if v is not None])
    if t == 0 or n_slots == 0:
        return out
    p = plan(slot, n_slots) if plan_ is None else plan_
    check_plan(p, t, n_slots)

    ieee = x.dtype == torch.float32 or (x.dtype == torch.bfloat16 and interpreting())
    rp = max(16, next_pow2(r))
    block_m = 16 if t <= 1024 else 64
    block_k = 256 if rp <= 32 else 128
    work = n_slots + triton.cdiv(t, block_m)
    # split K so that (splits x active work items) covers the SMs at decode sizes
    n_split = max(1, min(triton.cdiv(k, 4 * block_k), 16 if t <= 64 else 4))
    k_per_split = triton.cdiv(triton.cdiv(k, n_split), block_k) * block_k
    n_split = triton.cdiv(k, k_per_split)
    h = torch.empty(n_split, t, rp, dtype=torch.float32, device=x.device)
    s_p2 = max(64, next_pow2(n_slots))  # one compiled kernel for any S <= 64
    _shrink_kernel[(n_split, work)](
        x,
        lora_a,
        h,
        p.order,
        p.seg,
        t,
        k,
        r,
        n_slots,
        k_per_split,
        x.stride(0),
        x.stride(1),
        lora_a.stride(0),
        lora_a.stride(1),
        lora_a.stride(2),
        S_P2=s_p2,
        RP=rp,
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        IEEE=ieee,
        num_warps=4,
    )
    block_n = 128 if rp <= 64 else 64
    _expand_kernel[(triton.cdiv(n, block_n), work)](
        h,
        lora_b,
        scale if scale is not None else h,
        out,
        p.order,
        p.seg,
        t,
        n,
        r,
        n_slots,
        n_split,
        lora_b.stride(0),
        lora_b.stride(1),
        lora_b.stride(2),
        out.stride(0),
        out.stride(1),
        S_P2=s_p2,
        RP=rp,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        HAS_SCALE=scale is not None,
        IEEE=ieee,
        num_warps=4,
    )
    return out


forward_calls(__name__, "sgmv")

"""Rows of a compressed embedding delta, looked up per token in one launch (Triton)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltahub.errors import ShapeMismatchError

from ._common import check_device, next_pow2
from .dequant_triton import _dequant_tile
from .sbmm import _check


@triton.jit
def _embedding_kernel(
    ids_ptr,
    slot_ptr,
    qw_ptr,
    qh_ptr,
    meta_ptr,
    sc_ptr,
    out_ptr,
    T,
    K,
    S,
    V,
    n_qw,
    n_qh,
    n_meta,
    n_groups,
    s_qs,
    s_qn,
    s_hs,
    s_hn,
    s_ms,
    s_mn,
    s_ss,
    s_sn,
    BITS: tl.constexpr,
    SPARSE: tl.constexpr,
    GROUP: tl.constexpr,
    ZP: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < T
    sl = tl.load(slot_ptr + offs_t, mask=t_mask, other=-1)
    row = tl.load(ids_ptr + offs_t, mask=t_mask, other=0)
    live = t_mask & (sl >= 0) & (sl < S) & (row >= 0) & (row < V)
    sl = tl.where(live, sl, 0).to(tl.int64)
    row = tl.where(live, row, 0).to(tl.int64)
    k0 = tl.program_id(1) * BLOCK_K
    w = _dequant_tile(
        qw_ptr + sl * s_qs + row * s_qn,
        qh_ptr + sl * s_hs + row * s_hn,
        meta_ptr + sl * s_ms + row * s_mn,
        sc_ptr + sl * s_ss + row * s_sn,
        live,
        k0,
        n_qw,
        n_qh,
        n_meta,
        n_groups,
        BITS,
        SPARSE,
        GROUP,
        ZP,
        BLOCK_K,
        True,
        False,
    )
    offs_k = k0 + tl.arange(0, BLOCK_K)
    ptrs = out_ptr + offs_t.to(tl.int64)[:, None] * K + offs_k[None, :]
    tl.store(ptrs, tl.where(live[:, None], w, 0.0), mask=t_mask[:, None] & (offs_k < K)[None, :])


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
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: out[t] = dequant(Δ[slot[t]])[ids[t]] (zeros where slot[t] < 0 or ids[t] is out of range).

    Shape: ids [T] int; qweight [S, V, Wq] int32 ... as in ``sbmm``; slot [T] int -> out [T, k] fp32
    (written whole; allocated if None).
    """
    if ids.shape != slot.shape or ids.dim() != 1:
        raise ShapeMismatchError(f"ids {tuple(ids.shape)} and slot {tuple(slot.shape)} must be one 1-D shape")
    dummy_x = torch.empty(0, k, dtype=torch.float32, device=qweight.device)
    _check(dummy_x, qweight, scales, slot[:0], bits, sparse, group_size, k, meta, qweight_hi, None)
    check_device(ids, slot, qweight)
    t = ids.shape[0]
    if out is None:
        out = torch.empty(t, k, dtype=torch.float32, device=qweight.device)
    elif tuple(out.shape) != (t, k) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ShapeMismatchError(
            f"out must be contiguous float32 [{t}, {k}], got {out.dtype} {tuple(out.shape)}"
        )
    if t == 0:
        return out
    meta_ = meta if meta is not None else qweight
    hi_ = qweight_hi if qweight_hi is not None else qweight
    block_t, block_k = 16, min(256, max(64, next_pow2(k)))
    grid = (triton.cdiv(t, block_t), triton.cdiv(k, block_k))
    _embedding_kernel[grid](
        ids,
        slot,
        qweight,
        hi_,
        meta_,
        scales,
        out,
        t,
        k,
        qweight.shape[0],
        qweight.shape[1],
        qweight.shape[2],
        hi_.shape[2],
        meta_.shape[2],
        scales.shape[2],
        qweight.stride(0),
        qweight.stride(1),
        hi_.stride(0),
        hi_.stride(1),
        meta_.stride(0),
        meta_.stride(1),
        scales.stride(0),
        scales.stride(1),
        BITS=bits,
        SPARSE=sparse,
        GROUP=group_size or 0,
        ZP=(2**bits - 1) / 2,
        BLOCK_T=block_t,
        BLOCK_K=block_k,
    )
    return out

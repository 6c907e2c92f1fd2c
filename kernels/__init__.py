"""Triton kernels for serving deltas, each with a float32 torch reference (kernels/reference.py).

Public ops (see each one's ``Semantics:``): ``sbmm`` (compressed qlinear deltas), ``sgmv`` (LoRA),
``embedding_delta`` (rows of a compressed embedding delta), and ``plan`` (group a batch by slot
once, reuse it for every layer of a step). CUDA tensors run the Triton kernels; CPU tensors run the
reference. Importing this package does not import triton.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import Plan, plan

__all__ = ["Plan", "embedding_delta", "plan", "sbmm", "sgmv"]


def _use_triton(t: torch.Tensor) -> bool:
    return t.is_cuda


def sbmm(
    x,
    qweight,
    scales,
    slot,
    *,
    bits,
    sparse,
    group_size,
    k,
    meta=None,
    qweight_hi=None,
    out=None,
    plan_: Plan | None = None,
):
    """Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with slot[t] >= 0.

    Shape: x [T, k] fp16/bf16/fp32; qweight [S, N, Wq] int32; scales [S, N, G] fp32; meta [S, N, Wm]
    int32 (2:4 only); qweight_hi [S, N, Wh] int32 (3-bit only); slot [T] int32 (-1 = base only);
    out [T, N] in x's dtype (zeros if None). Returns out.
    """
    if _use_triton(x):
        from .sbmm_triton import sbmm as fn

        return fn(
            x,
            qweight,
            scales,
            slot,
            bits=bits,
            sparse=sparse,
            group_size=group_size,
            k=k,
            meta=meta,
            qweight_hi=qweight_hi,
            out=out,
            plan_=plan_,
        )
    return reference.sbmm(
        x,
        qweight,
        scales,
        slot,
        bits=bits,
        sparse=sparse,
        group_size=group_size,
        k=k,
        meta=meta,
        qweight_hi=qweight_hi,
        out=out,
    )


def sgmv(x, lora_a, lora_b, slot, *, scale=None, out=None, plan_: Plan | None = None):
    """Semantics: out[t] += scale[slot[t]] * (x[t] @ lora_a[slot[t]]ᵀ) @ lora_b[slot[t]]ᵀ (slot >= 0).

    Shape: x [T, K]; lora_a [S, r, K]; lora_b [S, N, r]; scale [S] fp32 or None (= 1); slot [T];
    out [T, N] in x's dtype (zeros if None). Returns out.
    """
    if _use_triton(x):
        from .sgmv_triton import sgmv as fn

        return fn(x, lora_a, lora_b, slot, scale=scale, out=out, plan_=plan_)
    return reference.sgmv(x, lora_a, lora_b, slot, scale=scale, out=out)


def embedding_delta(ids, qweight, scales, slot, *, bits, sparse, group_size, k, meta=None, qweight_hi=None):
    """Semantics: out[t] = dequant(Δ[slot[t]])[ids[t]] (zeros where slot[t] < 0).

    Shape: ids [T] int; qweight [S, V, Wq] ... as in sbmm; slot [T] -> out [T, k] float32.
    """
    if _use_triton(qweight):
        from .embedding_triton import embedding_delta as fn
    else:
        fn = reference.embedding_delta
    return fn(
        ids,
        qweight,
        scales,
        slot,
        bits=bits,
        sparse=sparse,
        group_size=group_size,
        k=k,
        meta=meta,
        qweight_hi=qweight_hi,
    )

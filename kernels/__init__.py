"""Triton kernels for serving deltas, each with a float32 torch reference (kernels/reference.py).

Public ops (see each one's ``Semantics:``): ``sbmm`` (compressed qlinear deltas), ``sbmm_device``
(the same on 2:4 2/4-bit deltas repacked into the GPU slot layout, kernels/layout.py), ``sgmv`` (LoRA),
``embedding_delta`` (rows of a compressed embedding delta), ``paged_decode_attention`` (decode
tokens over the paged KV cache), ``plan`` (group a batch by slot
once, reuse it for every layer of a step) and ``permute_x`` (the copy of an input that
``sbmm_device`` reads, shared by the layers that read it), ``rms_norm`` and ``act_mul`` (a
layer's projection inputs, with that copy written in the same launch); for the compressor, ``obs_block``
(one lazy block of the obs codec's column loop). CUDA tensors run the Triton kernels; CPU
tensors run the reference. Importing this package does not import triton.
"""

from __future__ import annotations

import torch

from . import reference
from ._common import Plan, plan

__all__ = [
    "Plan",
    "act_mul",
    "embedding_delta",
    "obs_block",
    "paged_decode_attention",
    "permute_x",
    "plan",
    "rms_norm",
    "sbmm",
    "sbmm_device",
    "sgmv",
]


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
        from .sbmm import sbmm as fn

        extra = {"plan_": plan_}
    else:
        fn, extra = reference.sbmm, {}
    return fn(x, qweight, scales, slot, bits=bits, sparse=sparse, group_size=group_size, k=k, meta=meta,
              qweight_hi=qweight_hi, out=out, **extra)


def sbmm_device(
    x, dw, scales, slot, *, bits, group_size, k, out=None, plan_: Plan | None = None, active=None, x_perm=None
):
    """Semantics: as ``sbmm``, on deltas in the GPU slot layout (``kernels/layout.py``: 2:4, 2/4-bit).

    Shape: x [T, k] fp16/bf16; dw [S, N, W] int16; scales [S, N, G] fp32; slot [T]; out [T, N].
    ``active``: at most how many distinct slots the tokens use (sizes the grid; see
    ``sbmm24.sbmm_device``); ``x_perm``: ``permute_x(x, k)`` if the
    caller has it. Returns out.
    """
    if _use_triton(x):
        from .sbmm24 import sbmm_device as fn

        extra = {"plan_": plan_, "active": active, "x_perm": x_perm}
    else:
        fn, extra = reference.sbmm_device, {}
    return fn(x, dw, scales, slot, bits=bits, group_size=group_size, k=k, out=out, **extra)


def permute_x(x, k):
    """x [T, k] fp16/bf16 on CUDA -> int32 [T, steps * 32]: the copy of x that ``sbmm_device`` reads
    (its ``x_perm``), made once where several layers read the same input."""
    from .sbmm24 import permute_x as fn

    return fn(x, k)


def rms_norm(x, weight, eps, *, delta=None, slot=None, permute=False):
    """Semantics: y[t] = (weight + delta[slot[t]]) * x[t] / sqrt(mean(x[t]²) + eps) (rounding:
    kernels/norm_act.py); with ``permute`` also ``permute_x(y, K)`` from the same launch.

    Shape: x [T, K]; weight [K]; delta [S + 1, K] float32 or None; slot [T] in [0, S]. Returns
    (y [T, K], int32 [T, steps * 32] or None). The Triton kernel on CUDA fp16/bf16, else the
    reference (``permute`` for 16-bit x only).
    """
    if _use_triton(x) and x.dtype in (torch.float16, torch.bfloat16):
        from .norm_act import rms_norm as fn
    else:
        fn = reference.rms_norm
    return fn(x, weight, eps, delta=delta, slot=slot, permute=permute)


def act_mul(g, u, act, *, permute=False):
    """Semantics: h = act(g) * u for act in silu, gelu, gelu_tanh; with ``permute`` also
    ``permute_x(h, N)`` from the same launch. Shape: g, u [T, N] -> (h [T, N], int32 or None)."""
    if _use_triton(g) and g.dtype in (torch.float16, torch.bfloat16):
        from .norm_act import act_mul as fn
    else:
        fn = reference.act_mul
    return fn(g, u, act, permute=permute)


def sgmv(x, lora_a, lora_b, slot, *, scale=None, out=None, plan_: Plan | None = None):
    """Semantics: out[t] += scale[slot[t]] * (x[t] @ lora_a[slot[t]]ᵀ) @ lora_b[slot[t]]ᵀ (slot >= 0).

    Shape: x [T, K]; lora_a [S, r, K]; lora_b [S, N, r]; scale [S] fp32 or None (= 1); slot [T];
    out [T, N] in x's dtype (zeros if None). Returns out.
    """
    if _use_triton(x):
        from .sgmv import sgmv as fn

        extra = {"plan_": plan_}
    else:
        fn, extra = reference.sgmv, {}
    return fn(x, lora_a, lora_b, slot, scale=scale, out=out, **extra)


def embedding_delta(ids, qweight, scales, slot, *, bits, sparse, group_size, k, meta=None, qweight_hi=None):
    """Semantics: out[t] = dequant(Δ[slot[t]])[ids[t]] (zeros where slot[t] < 0).

    Shape: ids [T] int; qweight [S, V, Wq] ... as in sbmm; slot [T] -> out [T, k] float32.
    """
    if _use_triton(qweight):
        from .embedding_triton import embedding_delta as fn
    else:
        fn = reference.embedding_delta
    return fn(ids, qweight, scales, slot, bits=bits, sparse=sparse, group_size=group_size, k=k, meta=meta,
              qweight_hi=qweight_hi)


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, scale, window=None):
    """Semantics: out[d, h] = softmax(scale q[d, h] · K_dᵀ) V_d over sequence d's cached positions
    p < context_lens[d] (p >= context_lens[d] - window with a window), read through block_tables.

    Shape: q [D, H, Dh]; caches [blocks, block_size, Hkv, Dh]; block_tables [D, max_blocks];
    context_lens [D] -> [D, H, Dh]. The Triton kernel on CUDA fp16/bf16, else the reference.
    """
    if _use_triton(q) and q.dtype in (torch.float16, torch.bfloat16):
        from .attention import paged_decode_attention as fn
    else:
        fn = reference.paged_decode_attention
    return fn(q, k_cache, v_cache, block_tables, context_lens, scale, window)


# kernels/sbmm.py and kernels/sgmv.py carry these ops' names: importing one rebinds the package
# attribute to the module, which then forwards calls to the op here (_common.forward_calls).
_OPS = {"sbmm": sbmm, "sgmv": sgmv}


def obs_block(w, u, scale, *, bits, sparse, codes=None, keep=None, err=None, fixed_mask=False):
    """Semantics: one lazy block of the OBS column loop: for j in order, 2:4 mask every 4 columns
    (top-2 of w² / U_jj²; ``fixed_mask``: the mask given in ``keep``), codes[:, j] =
    quantize(w[:, j], scale), err[:, j] = (w - q) / U_jj,
    w[:, j:] -= err[:, j] ⊗ U[j, j:] (details: kernels/obs_block_triton.py).

    Shape: w [n, B] fp32 (not modified); u [B, B] fp32; scale [n] fp32; outputs (given or
    allocated) codes [n, B] uint8, keep [n, B] bool (sparse only), err [n, B] fp32.
    Returns (codes, keep or None, err).
    """
    if _use_triton(w):
        from .obs_block_triton import obs_block as fn
    else:
        fn = reference.obs_block
    return fn(w, u, scale, bits=bits, sparse=sparse, codes=codes, keep=keep, err=err, fixed_mask=fixed_mask)

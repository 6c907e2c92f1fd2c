"""The two ops that make a decoder layer's projection inputs, each in one launch that can also write
the permuted copy ``sbmm_device`` reads (``layout.permute_x_torch``), so that no projection of a
step pays a permute of its own (only o_proj's input, made by attention, still needs one).

    rms_norm   y = (w + Δw[slot]) * rmsnorm(x)     (input of q / k / v and of gate / up)
    act_mul    h = act(g) * u                       (input of down; silu, gelu, gelu_tanh)

Rounding follows the torch ops the engine ran before (``reference.rms_norm`` / ``act_mul``): the
norm in float32, rounded to x's dtype, times the weight (+ Δ in float32) rounded to x's dtype;
act(g) rounded before the product. The permuted copy holds the same values, gathered per output
word (the permutation stays inside blocks of 64 inputs, so the gathers hit the cache).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltahub.errors import ModelSourceError, ShapeMismatchError

from . import layout as L
from ._common import check_device, next_pow2
from .sbmm24 import _src_word

ACTS = ("silu", "gelu", "gelu_tanh")


@triton.jit
def _perm_src(o):
    """Element index of the input that lands at element o of the permuted copy (pairs of 16-bit
    values move as int32 words, ``sbmm24._src_word``)."""
    return 2 * _src_word(o // 2) + o % 2


@triton.jit
def _round16(v, F16: tl.constexpr):
    """float32 -> fp16 / bf16, to nearest even (bf16 by hand: Triton's interpreter truncates)."""
    if F16:
        return v.to(tl.float16)
    else:
        u = v.to(tl.uint32, bitcast=True)
        u = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16) << 16
        return u.to(tl.float32, bitcast=True).to(tl.bfloat16)


@triton.jit
def _norm_values(x, w_ptr, d_ptr, e, k, rstd, HAS_DELTA: tl.constexpr, F16: tl.constexpr):
    """y at input elements e from x there (float32, 0 where e >= k), rounded as the module
    docstring says."""
    m = e < k
    w = tl.load(w_ptr + e, mask=m, other=0).to(tl.float32)
    if HAS_DELTA:
        w = _round16(w + tl.load(d_ptr + e, mask=m, other=0), F16).to(tl.float32)
    return _round16(_round16(x * rstd, F16).to(tl.float32) * w, F16)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, d_ptr, slot_ptr, y_ptr, yp_ptr, k, kp, s_x, s_y, s_yp, s_d, eps,
    HAS_DELTA: tl.constexpr, PERM: tl.constexpr, F16: tl.constexpr, BLOCK: tl.constexpr,
    BLOCK_P: tl.constexpr,
):  # fmt: skip
    """One token per program: y [k] and, with PERM, its permuted copy yp [kp] (16-bit elements)."""
    t = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + t * s_x
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_row + offs, mask=offs < k, other=0).to(tl.float32)
    rstd = tl.rsqrt(tl.sum(x * x, axis=0) / k + eps)
    d_row = d_ptr
    if HAS_DELTA:
        d_row = d_ptr + tl.load(slot_ptr + t).to(tl.int64) * s_d
    y = _norm_values(x, w_ptr, d_row, offs, k, rstd, HAS_DELTA, F16)
    tl.store(y_ptr + t * s_y + offs, y, mask=offs < k)
    if PERM:
        o = tl.arange(0, BLOCK_P)
        src = _perm_src(o)
        xs = tl.load(x_row + src, mask=src < k, other=0).to(tl.float32)
        yp = _norm_values(xs, w_ptr, d_row, src, k, rstd, HAS_DELTA, F16)
        tl.store(yp_ptr + t * s_yp + o, yp, mask=o < kp)


@triton.jit
def _act(g, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return g * tl.sigmoid(g)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * g * (1.0 + tl.math.erf(g * 0.7071067811865476))
    else:  # gelu, tanh approximation: tanh(z) = 2 sigmoid(2 z) - 1
        z = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        return g * tl.sigmoid(2.0 * z)


@triton.jit
def _act_values(g_ptr, u_ptr, e, n, ACT: tl.constexpr, F16: tl.constexpr):
    m = e < n
    g = tl.load(g_ptr + e, mask=m, other=0).to(tl.float32)
    u = tl.load(u_ptr + e, mask=m, other=0).to(tl.float32)
    return _round16(_round16(_act(g, ACT), F16).to(tl.float32) * u, F16)


@triton.jit
def _act_mul_kernel(
    g_ptr, u_ptr, h_ptr, hp_ptr, n, np_, s_g, s_u, s_h, s_hp,
    ACT: tl.constexpr, PERM: tl.constexpr, F16: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Grid (tokens, blocks of BLOCK elements of the padded width): h and, with PERM, hp."""
    t = tl.program_id(0).to(tl.int64)
    o = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    g_row, u_row = g_ptr + t * s_g, u_ptr + t * s_u
    tl.store(h_ptr + t * s_h + o, _act_values(g_row, u_row, o, n, ACT, F16), mask=o < n)
    if PERM:  # BLOCK is a multiple of 64: the block's sources are its own elements
        hp = _act_values(g_row, u_row, _perm_src(o), n, ACT, F16)
        tl.store(hp_ptr + t * s_hp + o, hp, mask=o < np_)


def _check_x(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.dtype not in (torch.float16, torch.bfloat16) or x.stride(1) != 1:
        raise ShapeMismatchError(
            f"{name} must be fp16/bf16 [T, K] with contiguous rows, got {x.dtype} {tuple(x.shape)}"
        )


def _permuted_out(x: torch.Tensor, k: int) -> torch.Tensor:
    """int32 [T, steps * 32] (what ``permute_x`` returns) for x [T, k]."""
    return torch.empty(x.shape[0], L.n_steps(k) * 32, dtype=torch.int32, device=x.device)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    delta: torch.Tensor | None = None,
    slot: torch.Tensor | None = None,
    permute: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantics: y[t] = (weight + delta[slot[t]]) * x[t] / sqrt(mean(x[t]²) + eps), rounded as
    the module docstring says; with ``permute`` also ``layout.permute_x_torch(y, K)``.

    Shape: x [T, K] fp16/bf16; weight [K] in x's dtype; delta [S + 1, K] float32 (or None) with
    slot [T] int in [0, S]. Returns (y [T, K], int32 [T, steps * 32] or None).
    """
    _check_x(x, "x")
    t, k = x.shape
    if weight.shape != (k,) or weight.dtype != x.dtype:
        raise ShapeMismatchError(f"weight must be {x.dtype} [{k}], got {weight.dtype} {tuple(weight.shape)}")
    has_delta = delta is not None
    if has_delta and (
        slot is None or delta.dim() != 2 or delta.shape[1] != k or delta.dtype != torch.float32
        or slot.shape != (t,)
    ):  # fmt: skip
        raise ShapeMismatchError(
            f"delta must be float32 [S + 1, {k}] with slot [{t}], got {tuple(delta.shape)} and "
            f"{None if slot is None else tuple(slot.shape)}"
        )
    check_device(x, weight, *([delta, slot] if has_delta else []))
    y = torch.empty_like(x)
    yp = _permuted_out(x, k) if permute else None
    if t:
        kp = L.n_steps(k) * L.STEP_K
        d = delta.contiguous() if has_delta else weight
        yp16 = y if yp is None else yp.view(x.dtype)
        _rms_norm_kernel[(t,)](
            x, weight.contiguous(), d, slot if has_delta else weight, y, yp16,
            k, kp, x.stride(0), y.stride(0), kp, d.stride(0), eps,
            HAS_DELTA=has_delta, PERM=permute, F16=x.dtype == torch.float16, BLOCK=next_pow2(k),
            BLOCK_P=next_pow2(kp), num_warps=8 if k >= 4096 else 4,
        )  # fmt: skip
    return y, yp


def act_mul(
    g: torch.Tensor, u: torch.Tensor, act: str, *, permute: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Semantics: h = act(g) * u (act(g) rounded to g's dtype first); with ``permute`` also
    ``layout.permute_x_torch(h, N)``.

    Shape: g, u [T, N] fp16/bf16 (same dtype). Returns (h [T, N], int32 [T, steps * 32] or None).
    """
    if act not in ACTS:
        raise ModelSourceError(f"act_mul: activation {act!r} is not one of {ACTS}")
    _check_x(g, "g")
    _check_x(u, "u")
    if g.shape != u.shape or g.dtype != u.dtype:
        raise ShapeMismatchError(f"g and u differ: {g.dtype} {tuple(g.shape)} / {u.dtype} {tuple(u.shape)}")
    check_device(g, u)
    t, n = g.shape
    h = torch.empty_like(g)
    hp = _permuted_out(g, n) if permute else None
    if t:
        np_ = L.n_steps(n) * L.STEP_K
        block = 1024
        _act_mul_kernel[(t, triton.cdiv(np_ if permute else n, block))](
            g, u, h, h if hp is None else hp.view(g.dtype), n, np_, g.stride(0), u.stride(0),
            h.stride(0), np_, ACT=ACTS.index(act), PERM=permute, F16=g.dtype == torch.float16,
            BLOCK=block, num_warps=4,
        )  # fmt: skip
    return h, hp

"""SBMM: one grouped launch applying to every token the compressed delta of its slot.

Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with slot[t] >= 0.

This kernel reads the stored layout of deltahub.format (every bit width, dense or 2:4, any group
size, fp32 activations too). 2:4 deltas with 2- or 4-bit codes in GPU slots are repacked and run by
``kernels/sbmm24.py``, several times faster.

The batch is grouped by slot on the device (``_common.plan``); the launch grid is
(output blocks, S + cdiv(T, BLOCK_M) work items), static in (S, T): each program turns its work-item
id into (slot, token block) from the segment offsets and exits early when it has none. A program
streams the packed rows of its output block once along K: codes and 2:4 positions are unpacked with a
shift and a mask per value, turned into floats by the exponent trick (OR the code into the mantissa
of 2**23, subtract 2**23 + zero point: exact, no int->float conversion), 2:4 pairs are placed into
their group of 4 with selects, and the dense tile is multiplied either on the tensor cores
(``tl.dot``, >= 16 tokens per tile) or by FMA reduction (a few tokens per tile). Scales are applied
once per row (or per group) to the accumulator, not per weight.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deltahub.errors import CodecError, ShapeMismatchError
from deltahub.format import QuantLayout

from ._common import (
    Plan,
    Tuner,
    batch_class,
    check_device,
    check_plan,
    forward_calls,
    interpreting,
    next_pow2,
    plan,
)
from .dequant_triton import _dequant_tile, _fields, _split_step, _values, _work_item


@triton.jit
def _sbmm_kernel(
    x_ptr,
    qw_ptr,
    qh_ptr,
    meta_ptr,
    sc_ptr,
    out_ptr,
    order_ptr,
    seg_ptr,
    N,
    K,
    S,
    n_qw,
    n_qh,
    n_meta,
    n_groups,
    s_xt,
    s_xk,
    s_qs,
    s_qn,
    s_hs,
    s_hn,
    s_ms,
    s_mn,
    s_ss,
    s_sn,
    s_ot,
    s_on,
    BITS: tl.constexpr,
    SPARSE: tl.constexpr,
    GROUP: tl.constexpr,
    ZP: tl.constexpr,
    S_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    MODE: tl.constexpr,
    IEEE: tl.constexpr,
    SCALE_IN: tl.constexpr,
    PER_TILE: tl.constexpr,
    GATHER: tl.constexpr,
    BIASED: tl.constexpr,
    EVEN: tl.constexpr,
):
    """Grid (output blocks, work items). SCALE_IN: group scales applied per value (groups smaller
    than BLOCK_K); PER_TILE: one group per K step, applied to the partial product; neither: one
    scale per row, applied at the end. GATHER: mode 2 on a 2:4 layout. BIASED: see _dequant_tile.
    EVEN: K and N are multiples of the blocks (mode 3 then loads without masks)."""
    s, tok, m_mask, n_work = _work_item(seg_ptr, order_ptr, S, S_P2, BLOCK_M)
    if tl.program_id(1) >= n_work:
        return

    # ---- output rows of this program, and their packed rows in slot s
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s64 = s.to(tl.int64)
    qw_rows = qw_ptr + s64 * s_qs + offs_n * s_qn
    qh_rows = qh_ptr + s64 * s_hs + offs_n * s_hn
    meta_rows = meta_ptr + s64 * s_ms + offs_n * s_mn
    sc_rows = sc_ptr + s64 * s_ss + offs_n * s_sn
    n_valid = tl.sum(m_mask.to(tl.int32), axis=0)
    cols = tl.arange(0, BLOCK_M)

    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
    FW3: tl.constexpr = 2 if BITS == 3 else BITS
    UV0: tl.constexpr = 32 if BITS == 3 else 32 // FW3
    UV3: tl.constexpr = UV0 if (UV0 >= 16 or not SPARSE) else 16
    BW3: tl.constexpr = BLOCK_K // (2 if SPARSE else 1) // UV3  # mode 3: unit columns per row per step
    xacc = tl.zeros((BW3, BLOCK_M), dtype=tl.float32)
    offs_kb = tl.arange(0, BLOCK_K)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + offs_kb
        if MODE != 3 and not GATHER:  # the dense-expanded tile of modes 0, 1 (and 2 on dense layouts)
            w_tile = _dequant_tile(
                qw_rows,
                qh_rows,
                meta_rows,
                sc_rows,
                n_mask,
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
                SCALE_IN,
                BIASED,
            )
        if MODE == 0:  # dense-expanded tile on the tensor cores, all BLOCK_M tokens at once
            xt = tl.load(
                x_ptr + tok[None, :] * s_xt + offs_k[:, None] * s_xk,
                mask=m_mask[None, :] & (offs_k < K)[:, None],
                other=0.0,
            )
            if IEEE:
                part = tl.dot(w_tile, xt.to(tl.float32), input_precision="ieee")
            else:
                part = tl.dot(w_tile.to(xt.dtype), xt)
            xs = tl.sum(xt.to(tl.float32), axis=0)
        elif MODE == 3:  # split by field: elementwise dequant straight into tensor-core operands
            if PER_TILE:  # a fresh partial product per K step, scaled per tile below
                a_in = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
                x_in = tl.zeros((BW3, BLOCK_M), dtype=tl.float32)
            else:  # accumulate straight into acc; x sums reduced once after the loop
                a_in = acc
                x_in = xacc
            a_out, x_out = _split_step(
                a_in,
                x_in,
                x_ptr,
                tok,
                s_xt,
                s_xk,
                K,
                qw_rows,
                qh_rows,
                meta_rows,
                sc_rows,
                n_mask,
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
                SCALE_IN,
                BIASED,
                IEEE,
                EVEN,
            )
            if PER_TILE:
                part = a_out
                xs = tl.sum(x_out, axis=0)
            else:
                acc = a_out
                xacc = x_out
        elif GATHER:  # FMA on the kept values only, x gathered at their positions; token by token
            v0 = k0 // 2
            v = _values(
                qw_rows,
                qh_rows,
                sc_rows,
                n_mask,
                v0,
                n_qw,
                n_qh,
                n_groups,
                BITS,
                SPARSE,
                GROUP,
                ZP,
                BLOCK_K // 2,
                SCALE_IN,
                False,
            )
            jl = tl.arange(0, BLOCK_K // 2)
            kk = k0 + (jl // 2 * 4)[None, :] + _fields(meta_rows, n_mask, v0, n_meta, BLOCK_K // 2, 2)
            kmask = n_mask[:, None] & (kk < K)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for m in tl.static_range(BLOCK_M):
                if m < n_valid:
                    tm = tl.sum(tl.where(cols == m, tok, 0), axis=0)
                    xg = tl.load(x_ptr + tm * s_xt + kk * s_xk, mask=kmask, other=0.0).to(tl.float32)
                    part += tl.where(cols[None, :] == m, tl.sum(v * xg, axis=1)[:, None], 0.0)
        else:  # dense-expanded tile, FMA token by token (skips the empty token slots of the tile)
            part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for m in tl.static_range(BLOCK_M):
                if m < n_valid:
                    tm = tl.sum(tl.where(cols == m, tok, 0), axis=0)
                    xm = tl.load(x_ptr + tm * s_xt + offs_k * s_xk, mask=offs_k < K, other=0.0).to(tl.float32)
                    part += tl.where(cols[None, :] == m, tl.sum(w_tile * xm[None, :], axis=1)[:, None], 0.0)
                    xs += tl.where(cols == m, tl.sum(xm, axis=0), 0.0)
        if PER_TILE:
            sc = tl.load(sc_rows + k0 // GROUP, mask=n_mask, other=0.0)
            if BIASED:
                part = part - 0.5 * xs[None, :]
            acc += part * sc[:, None]
        elif MODE != 3:
            acc += part
            if BIASED:
                xsum += xs
    if MODE == 3 and not PER_TILE:
        xsum = tl.sum(xacc, axis=0)
    if GROUP == 0:
        acc = (acc - 0.5 * xsum[None, :]) * tl.load(sc_rows, mask=n_mask, other=0.0)[:, None]

    o_ptrs = out_ptr + tok[None, :] * s_ot + offs_n[:, None] * s_on
    o_mask = n_mask[:, None] & m_mask[None, :]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _unit_values(bits: int, sparse: bool) -> int:
    """Stored values per unit column in mode 3 (see dequant_triton._split_step)."""
    per = 16 if bits == 3 else 32 // bits
    uv = 32 if bits == 3 else per
    return max(uv, 16) if sparse else uv


class Config(NamedTuple):
    """Launch configuration: tile sizes (tokens, outputs, dense inputs), warps, stages, and the mode:
    0 dense-expanded tile on the tensor cores (block_m >= 16); 1 dense-expanded tile, FMA token by
    token; 2 (2:4 only, else as 1) FMA on the kept values with x gathered at their positions;
    3 split by field: no reshapes, the tile stays in registers in the tensor-core operand layout
    (block_k is raised where a layout's units need it)."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    mode: int = 0


# Candidates for Hopper (sm_90), chosen from the SASS instruction count per stored value of each
# variant (benchmarks/NOTES-sbmm.md) and the H200 timings: mode 3 with 8-16-token tiles for decode,
# mode 0 with 128-token tiles for prefill, mode 2 for single tokens on long rows. The autotuner times
# them per (shape, layout, slots, batch class) and keeps the fastest.
DECODE_CONFIGS = [
    Config(16, 128, 1024, 8, 2, 3),
    Config(16, 128, 512, 8, 3, 3),
    Config(16, 64, 512, 4, 3, 3),
    Config(8, 128, 1024, 8, 2, 3),
    Config(16, 64, 128, 4, 4, 0),
    Config(4, 32, 256, 4, 3, 2),
]
PREFILL_CONFIGS = [
    Config(128, 128, 64, 8, 3, 0),
    Config(64, 128, 64, 4, 4, 0),
    Config(128, 128, 1024, 8, 2, 3),
]
INTERPRET_CONFIG = Config(16, 64, 256, 4, 1)
TUNER = Tuner()


def _ieee_dot(dtype: torch.dtype) -> bool:
    """fp32 dot without tf32 rounding: for fp32 inputs, and for bf16 under the interpreter (whose
    bf16 dot is wrong in triton 3.9)."""
    return dtype == torch.float32 or (dtype == torch.bfloat16 and interpreting())


def _check(x, qweight, scales, slot, bits, sparse, group_size, k, meta, qweight_hi, out):
    layout = QuantLayout(bits=bits, sparsity="2:4" if sparse else "none", group_size=group_size)
    if x.dim() != 2 or x.shape[1] != k:
        raise ShapeMismatchError(f"x must be [T, {k}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    if qweight.dim() != 3:
        raise ShapeMismatchError(f"qweight must be [S, N, Wq], got {tuple(qweight.shape)}")
    s, n = qweight.shape[:2]
    expected = layout.part_shapes(n, k)
    given = {"qweight": qweight, "scales": scales, "meta": meta, "qweight_hi": qweight_hi}
    for name, shp in expected.items():
        t = given[name]
        if t is None:
            raise CodecError(f"{name} is needed for bits={bits}, sparse={sparse}")
        if tuple(t.shape) != (s, *shp):
            raise ShapeMismatchError(f"{name} must be {(s, *shp)}, got {tuple(t.shape)}")
        want = torch.float32 if name == "scales" else torch.int32
        if t.dtype != want:
            raise TypeError(f"{name} must be {want}, got {t.dtype}")
        if t.stride(-1) != 1:
            raise ShapeMismatchError(f"{name} must be contiguous along its last dim")
    if slot.shape != (x.shape[0],) or slot.dtype not in (torch.int32, torch.int64):
        raise ShapeMismatchError(f"slot must be int32 [{x.shape[0]}], got {slot.dtype} {tuple(slot.shape)}")
    if out is not None and (tuple(out.shape) != (x.shape[0], n) or out.dtype != x.dtype):
        raise ShapeMismatchError(
            f"out must be {x.dtype} [{x.shape[0]}, {n}], got {out.dtype} {tuple(out.shape)}"
        )
    check_device(*[t for t in (x, qweight, scales, slot, meta, qweight_hi, out) if t is not None])
    return layout


def tune_key(dtype, k, n, bits, sparse, group_size, n_slots, t) -> tuple:
    """Autotuning key: the shape, the layout, the slot count and the batch-size class."""
    return ("sbmm", dtype, k, n, bits, sparse, group_size, n_slots, batch_class(t))


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
    plan_: Plan | None = None,
    config: Config | None = None,
) -> torch.Tensor:
    """Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with 0 <= slot[t] < S.

    Shape: x [T, k] fp16/bf16/fp32; qweight [S, N, Wq] int32; scales [S, N, G] fp32;
    meta [S, N, Wm] int32 (2:4); qweight_hi [S, N, Wh] int32 (3-bit); slot [T] int32;
    out [T, N] same dtype as x (zeros if None). ``plan_``: a precomputed ``plan(slot, S)`` (reuse it
    across layers); ``config``: force a launch config (else autotuned per shape/bits/batch class).
    """
    _check(x, qweight, scales, slot, bits, sparse, group_size, k, meta, qweight_hi, out)
    n_slots, n = qweight.shape[:2]
    t = x.shape[0]
    if out is None:
        out = torch.zeros(t, n, dtype=x.dtype, device=x.device)
    if t == 0 or n_slots == 0:
        return out
    p = plan(slot, n_slots) if plan_ is None else plan_
    check_plan(p, t, n_slots)
    meta_ = meta if meta is not None else qweight
    hi_ = qweight_hi if qweight_hi is not None else qweight

    gs = group_size or 0

    def launch(c: Config, o: torch.Tensor) -> None:
        if c.mode == 3:  # a dot needs >= 16 unit columns: widen the K step for wide units
            c = c._replace(block_k=max(c.block_k, 16 * (2 if sparse else 1) * _unit_values(bits, sparse)))
        # work items <= (non-empty slots <= min(S, T)) + cdiv(T, BM)
        grid = (triton.cdiv(n, c.block_n), min(n_slots, t) + triton.cdiv(t, c.block_m))
        _sbmm_kernel[grid](
            x,
            qweight,
            hi_,
            meta_,
            scales,
            o,
            p.order,
            p.seg,
            n,
            k,
            n_slots,
            qweight.shape[2],
            hi_.shape[2],
            meta_.shape[2],
            scales.shape[2],
            x.stride(0),
            x.stride(1),
            qweight.stride(0),
            qweight.stride(1),
            hi_.stride(0),
            hi_.stride(1),
            meta_.stride(0),
            meta_.stride(1),
            scales.stride(0),
            scales.stride(1),
            o.stride(0),
            o.stride(1),
            BITS=bits,
            SPARSE=sparse,
            GROUP=gs,
            ZP=(2**bits - 1) / 2,
            S_P2=max(64, next_pow2(n_slots)),  # one compiled kernel for any S <= 64
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            BLOCK_K=c.block_k,
            MODE=c.mode,
            SCALE_IN=0 < gs < c.block_k,
            PER_TILE=gs >= c.block_k,
            GATHER=c.mode == 2 and sparse,
            BIASED=not (0 < gs < c.block_k) and not (c.mode == 2 and sparse),
            EVEN=k % c.block_k == 0 and n % c.block_n == 0,
            IEEE=_ieee_dot(x.dtype),
            num_warps=c.num_warps,
            num_stages=c.num_stages,
        )

    if config is None:
        key = tune_key(x.dtype, k, n, bits, sparse, group_size, n_slots, t)
        if interpreting():
            cands = [INTERPRET_CONFIG]
        else:
            cands = DECODE_CONFIGS if t <= 256 else PREFILL_CONFIGS
        config = TUNER.pick(key, cands, lambda c: launch(c, torch.empty_like(out)))
    launch(config, out)
    return out


forward_calls(__name__, "sbmm")

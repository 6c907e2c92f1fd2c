"""SBMM on the GPU slot layout (kernels/layout.py): 2:4 deltas with 2- or 4-bit codes.

Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with 0 <= slot[t] < S.

On CUDA the 2:4 structure goes to the sparse tensor cores: every warp runs ``mma.sp ... m16n8k32``
(inline PTX) on 4 tiles of 16 output rows, with the kept values as the compressed A operand, the
stored positions as its metadata and 8 tokens of x as B. The layout stores each thread's registers
in the order it holds them, so the kernel's tensors are [threads, 4] (one row per thread: Triton's
blocked layout with 4 elements per thread, which ``pack=4`` hands to the asm whole) and the decode
is a LOP3 into the mantissa of 128 (1024 in fp16) and one packed FMA per 2 kept values, plus a
shift shared by the registers whose codes fit one window (``decode_plan``), giving ``2 (c - z)``
exactly (the 1/2 goes into the row scale). No placement of the pairs, no masks. Grids: one task
(work item x group of row blocks) per program, split-K, or stream-K (equal shares per program);
pieces of a task add into out with packed 16-bit reductions (``_red_add``). Loads run ahead in
registers (``Config.depth``) or through a shared-memory ring (``Config.stages``).
Under TRITON_INTERPRET=1 (no asm) a plain-Triton kernel decodes the same layout into dense tiles
(``_sbmm24_interp_kernel``, same grids but split-K), which the CPU tests check.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deltahub.errors import CodecError, ShapeMismatchError

from . import layout as L
from ._common import (
    Plan,
    Tuner,
    batch_class,
    check_device,
    check_plan,
    interpreting,
    n_sms,
    next_pow2,
    plan,
)
from .dequant_triton import _segment, _segment_at, _work_item


class DecodeOp(NamedTuple):
    """How one A register is decoded from its tile's code word w (both 16-bit halves at once):
    ``t = (w >> shift) & mask | magic`` (shift < 0: left), whose halves are the 16-bit floats
    M + c 2^q exactly, then ``t mult + add`` = 2 (c - z) exactly: one packed FMA per register
    (``ACC_SCALE`` undoes the factor 2)."""

    shift: int
    mask: int
    magic: int
    mult: int
    add: int


def _f16_bits(v: float, f16: bool) -> int:
    """The 16-bit pattern of v in fp16 / bf16, which must hold it exactly."""
    t = torch.tensor(v, dtype=torch.float16 if f16 else torch.bfloat16)
    assert float(t) == v, f"{v} is not exact in {t.dtype}"
    return int(t.view(torch.int16)) & 0xFFFF


ACC_SCALE = 0.5  # the decode gives 2 (c - z): what the accumulators are multiplied by at the end
_ACC: tl.constexpr = tl.constexpr(ACC_SCALE)


def decode_plan(bits: int, f16: bool, kk: int) -> list[DecodeOp]:
    """The 4 registers (i) of sub-step kk: code c0 at bit o of w, c1 at o + 16, placed at bit q of
    each half, with 1 <= q <= mantissa bits - bits (t exact; and M 2^(1-q) + 2^bits - 1 exact, which
    q = 0 is not). Registers share one shift when their codes fit the same window: 2-bit bf16 needs
    2 shifts per sub-step, fp16 1 (4-bit: bf16 4, fp16 2). The result is 2 (c - z)."""
    mant, big = (10, 1024.0) if f16 else (7, 128.0)
    q_max = mant - bits
    z = ((1 << bits) - 1) / 2
    ops, shift = [], None
    for i in range(4):
        o = 4 * i if bits == 4 else 2 * (4 * kk + i)
        if shift is None or not 1 <= o - shift <= q_max:
            shift = o - 1
        q = o - shift
        assert 1 <= q <= q_max
        mult = 2.0 ** (1 - q)
        add = -(big * mult + 2 * z)
        half = lambda v: _f16_bits(v, f16)  # noqa: E731
        ops.append(
            DecodeOp(
                shift=shift,
                mask=((1 << bits) - 1) << q | ((1 << bits) - 1) << (q + 16),
                magic=half(big) * 0x10001,
                mult=half(mult) * 0x10001,
                add=half(add) * 0x10001,
            )
        )
    return ops


def _decode_asm(bits: int, f16: bool, kk: int) -> str:
    """PTX of ``decode_plan``: the code words of 4 tiles ($16..$19) -> their A fragments for
    sub-step kk ($4r + i), each register two packed 16-bit floats 2 (c - z) (c0 low, c1 high).
    Shifts are multiplies (IMAD, FMA pipe), so the ALU pipe only carries the LOP3s."""
    fma = "fma.rn.f16x2" if f16 else "fma.rn.bf16x2"
    plan_ = decode_plan(bits, f16, kk)
    consts = sorted({v for op in plan_ for v in (op.mult, op.add)})  # packed operands
    out = ["{", f".reg .b32 %t<16>, %s<16>, %c<{len(consts)}>;"]
    out += [f"mov.b32 %c{j}, {v:#010x};" for j, v in enumerate(consts)]
    c = {v: f"%c{j}" for j, v in enumerate(consts)}
    for r in range(4):
        shifted = {}
        for i, op in enumerate(plan_):
            w = f"${16 + r}"
            if op.shift not in shifted:
                sreg = f"%s{4 * r + len(shifted)}"
                if op.shift < 0:
                    out.append(f"mul.lo.u32 {sreg}, {w}, {1 << -op.shift};")
                elif op.shift > 0:
                    out.append(f"mul.hi.u32 {sreg}, {w}, {1 << (32 - op.shift)};")
                else:
                    sreg = w
                shifted[op.shift] = sreg
            t = f"%t{4 * r + i}"
            out.append(f"lop3.b32 {t}, {shifted[op.shift]}, {op.mask:#010x}, {op.magic:#010x}, 0xEA;")
            out.append(f"{fma} ${4 * r + i}, {t}, {c[op.mult]}, {c[op.add]};")
    out.append("}")
    return "\n".join(out)


def _mma_asm(f16: bool, kk: int) -> str:
    """PTX: 4 tiles (r) of D = A_r B + C_r; outputs $4r..$4r+3, inputs C_r $16 + 4r.., A_r $32 + 4r..,
    B $48..$51, metadata words $52..$55 (word 2 kk + r // 2, sparsity selector r % 2)."""
    ty = "f16" if f16 else "bf16"
    op = f"mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.{ty}.{ty}.f32"
    tiles = [
        (",".join(f"${4 * r + i}" for i in range(4)), ",".join(f"${16 + 4 * r + i}" for i in range(4)),
         ",".join(f"${32 + 4 * r + i}" for i in range(4)), f"${52 + 2 * kk + r // 2}, {r % 2}")
        for r in range(4)
    ]  # fmt: skip
    out = [f"{op} {{{d}}}, {{{a}}}, {{$48,$49,$50,$51}}, {{{c}}}, {m};" for d, c, a, m in tiles]
    return "\n".join(out)


DEC_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=r"] * 16 + ["r"] * 4))
MMA_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=f"] * 16 + ["f"] * 16 + ["r"] * 24))
DEC4_BF16: tl.constexpr = tl.constexpr(_decode_asm(4, False, 0))
DEC4_F16: tl.constexpr = tl.constexpr(_decode_asm(4, True, 0))
DEC2_BF16_0: tl.constexpr = tl.constexpr(_decode_asm(2, False, 0))
DEC2_BF16_1: tl.constexpr = tl.constexpr(_decode_asm(2, False, 1))
DEC2_F16_0: tl.constexpr = tl.constexpr(_decode_asm(2, True, 0))
DEC2_F16_1: tl.constexpr = tl.constexpr(_decode_asm(2, True, 1))
MMA_BF16_0: tl.constexpr = tl.constexpr(_mma_asm(False, 0))
MMA_BF16_1: tl.constexpr = tl.constexpr(_mma_asm(False, 1))
MMA_F16_0: tl.constexpr = tl.constexpr(_mma_asm(True, 0))
MMA_F16_1: tl.constexpr = tl.constexpr(_mma_asm(True, 1))


@triton.jit
def _decode4(cw, KK: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """Code words [T, 4] (tile r in column r) -> A fragments of the 4 tiles, each [T, 4] int32."""
    if BITS == 4 and F16:
        asm: tl.constexpr = DEC4_F16
    elif BITS == 4:
        asm: tl.constexpr = DEC4_BF16
    elif F16 and KK == 0:
        asm: tl.constexpr = DEC2_F16_0
    elif F16:
        asm: tl.constexpr = DEC2_F16_1
    elif KK == 0:
        asm: tl.constexpr = DEC2_BF16_0
    else:
        asm: tl.constexpr = DEC2_BF16_1
    return tl.inline_asm_elementwise(asm, DEC_CONSTRAINTS, [cw], dtype=(tl.int32,) * 4, is_pure=True, pack=4)


@triton.jit
def _mma4(c0, c1, c2, c3, a0, a1, a2, a3, b, m, KK: tl.constexpr, F16: tl.constexpr):
    """C_r += A_r B for the 4 tiles (sparse tensor cores); every operand [T, 4] (a thread's registers)."""
    if F16 and KK == 0:
        asm: tl.constexpr = MMA_F16_0
    elif F16:
        asm: tl.constexpr = MMA_F16_1
    elif KK == 0:
        asm: tl.constexpr = MMA_BF16_0
    else:
        asm: tl.constexpr = MMA_BF16_1
    return tl.inline_asm_elementwise(
        asm,
        MMA_CONSTRAINTS,
        [c0, c1, c2, c3, a0, a1, a2, a3, b, m],
        dtype=(tl.float32,) * 4,
        is_pure=True,
        pack=4,
    )


@triton.jit
def _load_step(wb, xb0, xm0, xb1, xm1, u, BITS: tl.constexpr, BLOCK_M: tl.constexpr):
    """Everything step u reads: code words of sub-steps 0 / 1 (2-bit: one word), metadata words, B
    fragments of token blocks 0 / 1 for sub-steps 0 / 1; each [T, 4] int32."""
    P: tl.constexpr = 3 if BITS == 4 else 2
    wp = wb + u * (P * 128)
    cw_a = tl.load(wp)
    if BITS == 4:
        cw_b = tl.load(wp + 128)
    else:
        cw_b = cw_a
    mw = tl.load(wp + (P - 1) * 128)
    x0 = tl.load(xb0 + u * 32, mask=xm0, other=0)
    x1 = tl.load(xb0 + u * 32 + 16, mask=xm0, other=0)
    if BLOCK_M == 16:
        y0 = tl.load(xb1 + u * 32, mask=xm1, other=0)
        y1 = tl.load(xb1 + u * 32 + 16, mask=xm1, other=0)
    else:
        y0 = x0
        y1 = x1
    return cw_a, cw_b, mw, x0, x1, y0, y1


def _red_pairs_asm(f16: bool) -> str:
    """PTX: add a thread's 4 accumulator values ($4..$7, fp32; element i = row R + 8 (i // 2),
    token 2p + i % 2, pointers $8..$11, masks $12..$15) into out as 2 packed 16-bit pairs of
    adjacent rows. Lanes 4 apart hold rows R and R + 1 of the same tokens: they swap one value
    (``shfl.bfly``), the even-row lane adds (R, R + 1) of token 2p, the odd one (R - 1, R) of token
    2p + 1, each with one fire-and-forget ``red ... x2`` (16-bit scalar atomics compile to
    compare-and-swap loops). Needs out rows contiguous, an even row stride and an even N."""
    ty = "f16x2" if f16 else "bf16x2"
    out = [
        "{",
        ".reg .pred odd, ok;",
        ".reg .b32 ln, m;",
        ".reg .f32 snd, rcv, lo, hi;",
        ".reg .b32 w;",
        ".reg .b64 a, b;",
        "mov.u32 ln, %laneid;",
        "and.b32 ln, ln, 4;",
        "setp.ne.b32 odd, ln, 0;",
    ]
    for h in range(2):
        v0, v1, p0, p1, m0, m1 = (f"${4 + 2 * h}", f"${5 + 2 * h}", f"${8 + 2 * h}", f"${9 + 2 * h}",
                                  f"${12 + 2 * h}", f"${13 + 2 * h}")  # fmt: skip
        out += [
            f"selp.f32 snd, {v0}, {v1}, odd;",
            "shfl.sync.bfly.b32 rcv, snd, 4, 0x1f, 0xffffffff;",
            f"selp.f32 lo, rcv, {v0}, odd;",
            f"selp.f32 hi, {v1}, rcv, odd;",
            f"cvt.rn.{ty}.f32 w, hi, lo;",
            f"sub.s64 b, {p1}, 2;",
            f"selp.b64 a, b, {p0}, odd;",
            f"selp.b32 m, {m1}, {m0}, odd;",
            "setp.ne.b32 ok, m, 0;",
            f"@ok red.relaxed.gpu.global.add.noftz.{ty} [a], w;",
        ]
    out += ["mov.b32 $0, 0;", "mov.b32 $1, 0;", "mov.b32 $2, 0;", "mov.b32 $3, 0;", "}"]
    return "\n".join(out)


RED_PAIRS_BF16: tl.constexpr = tl.constexpr(_red_pairs_asm(False))
RED_PAIRS_F16: tl.constexpr = tl.constexpr(_red_pairs_asm(True))
RED_CONSTRAINTS: tl.constexpr = tl.constexpr(",".join(["=r"] * 4 + ["f"] * 4 + ["l"] * 4 + ["r"] * 4))


@triton.jit
def _red_add(ptrs, val, mask, PAIRS: tl.constexpr):
    """*ptrs += val where mask, for a tile's accumulator [T, 4] (fp32) and its out pointers (bf16 or
    fp16): packed pair reductions if PAIRS (``_red_pairs_asm``; the pointers go in as int64, which
    triton 3.6 needs next to float operands), else ``tl.atomic_add``."""
    if PAIRS:
        if ptrs.dtype.element_ty == tl.float16:
            asm: tl.constexpr = RED_PAIRS_F16
        else:
            asm: tl.constexpr = RED_PAIRS_BF16
        tl.inline_asm_elementwise(
            asm, RED_CONSTRAINTS, [val, ptrs.to(tl.int64), mask.to(tl.int32)], dtype=tl.int32, is_pure=False,
            pack=4,
        )
    else:
        tl.atomic_add(ptrs, val.to(ptrs.dtype.element_ty), mask=mask, sem="relaxed")


@triton.jit
def _store_tile(
    acc,
    r: tl.constexpr,
    jn: tl.constexpr,
    blk,
    g,
    p,
    i4,
    start,
    seg_hi,
    N,
    s64,
    order_ptr,
    sc_ptr,
    s_ss,
    s_sn,
    out_ptr,
    s_ot,
    s_on,
    GROUP: tl.constexpr,
    atomic,
    PAIRS: tl.constexpr,
):
    """out[tok, row] += acc x ``ACC_SCALE`` x the row scale for tile r, token block jn (atomically if
    ``atomic``: see ``_red_add``); acc [T, 4] as mma.sp leaves it: element i = row 16 r + g + 8 (i // 2),
    token 8 jn + 2 p + i % 2."""
    row = (blk * 64 + 16 * r + g)[:, None] + 8 * (i4 // 2)[None, :]
    acc = acc * _ACC
    m = start + (8 * jn + 2 * p)[:, None] + (i4 % 2)[None, :]
    ok = (row < N) & (m < seg_hi)
    tok = tl.load(order_ptr + m, mask=ok, other=0)
    if GROUP == 0:
        acc = acc * tl.load(sc_ptr + s64 * s_ss + row * s_sn, mask=ok, other=0.0)
    o_ptrs = out_ptr + tok * s_ot + row * s_on
    if atomic:
        _red_add(o_ptrs, acc, ok, PAIRS)
    else:
        prev = tl.load(o_ptrs, mask=ok, other=0.0)
        tl.store(o_ptrs, (prev.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fold(c, part, r: tl.constexpr, blk, g, i4, N, sc_base, s_sn, gi):
    """c + part x the group scale (group gi) of its rows, for group-scaled deltas."""
    row = (blk * 64 + 16 * r + g)[:, None] + 8 * (i4 // 2)[None, :]
    return c + part * tl.load(sc_base + row * s_sn + gi, mask=row < N, other=0.0)


@triton.jit
def _stream_range(n_tasks, n_steps):
    """Stream-K: this program's share [lo, hi) of the n_tasks x n_steps units (task-major), the
    same number (+- 1) for every program in use. Shares are at least n_steps / 4 units, so a task
    is cut into at most 5 pieces (each piece rounds once into the 16-bit output); programs past
    the ones needed get an empty share."""
    units = n_tasks.to(tl.int64) * n_steps
    p = tl.program_id(0).to(tl.int64)
    n_p = tl.maximum(tl.minimum(tl.num_programs(0), units // tl.cdiv(n_steps, 4)), 1)
    lo = tl.minimum(p, n_p) * units // n_p
    hi = tl.minimum(p + 1, n_p) * units // n_p
    return lo.to(tl.int32), hi.to(tl.int32)


@triton.jit
def _stream_task(cur, hi, n_steps, NG):
    """The task at unit ``cur`` (work item w, output group rg) and the steps [u_lo, u_hi) of it that
    a program whose share ends at ``hi`` runs; a task run in pieces must add atomically."""
    task = cur // n_steps
    u_lo = cur - task * n_steps
    u_hi = tl.minimum(n_steps, u_lo + (hi - cur))
    w = task // NG
    return w, task - w * NG, u_lo, u_hi, (u_lo > 0) | (u_hi < n_steps)


@triton.jit
def _step(
    acc,
    data,
    u,
    blk,
    g,
    i4,
    N,
    sc_base,
    s_sn,
    n_groups,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    F16: tl.constexpr,
):
    """The 8 accumulators (tile r, token block j: c_rj, [T, 4]) after step u, whose loaded words
    and x fragments are ``data`` (``_load_step``)."""
    c00, c10, c20, c30, c01, c11, c21, c31 = acc
    cw_a, cw_b, mw, x0, x1, y0, y1 = data
    T: tl.constexpr = c00.shape[0]
    if GROUP > 0:
        q00 = tl.zeros((T, 4), dtype=tl.float32)
        q10 = tl.zeros((T, 4), dtype=tl.float32)
        q20 = tl.zeros((T, 4), dtype=tl.float32)
        q30 = tl.zeros((T, 4), dtype=tl.float32)
        q01 = tl.zeros((T, 4), dtype=tl.float32)
        q11 = tl.zeros((T, 4), dtype=tl.float32)
        q21 = tl.zeros((T, 4), dtype=tl.float32)
        q31 = tl.zeros((T, 4), dtype=tl.float32)
    else:
        q00, q10, q20, q30, q01, q11, q21, q31 = c00, c10, c20, c30, c01, c11, c21, c31
    f0, f1, f2, f3 = _decode4(cw_a, 0, BITS, F16)
    q00, q10, q20, q30 = _mma4(q00, q10, q20, q30, f0, f1, f2, f3, x0, mw, 0, F16)
    if BLOCK_M == 16:
        q01, q11, q21, q31 = _mma4(q01, q11, q21, q31, f0, f1, f2, f3, y0, mw, 0, F16)
    f0, f1, f2, f3 = _decode4(cw_b, 1, BITS, F16)
    q00, q10, q20, q30 = _mma4(q00, q10, q20, q30, f0, f1, f2, f3, x1, mw, 1, F16)
    if BLOCK_M == 16:
        q01, q11, q21, q31 = _mma4(q01, q11, q21, q31, f0, f1, f2, f3, y1, mw, 1, F16)
    if GROUP > 0:
        gi = tl.minimum((u * 64) // GROUP, n_groups - 1)
        c00 = _fold(c00, q00, 0, blk, g, i4, N, sc_base, s_sn, gi)
        c10 = _fold(c10, q10, 1, blk, g, i4, N, sc_base, s_sn, gi)
        c20 = _fold(c20, q20, 2, blk, g, i4, N, sc_base, s_sn, gi)
        c30 = _fold(c30, q30, 3, blk, g, i4, N, sc_base, s_sn, gi)
        if BLOCK_M == 16:
            c01 = _fold(c01, q01, 0, blk, g, i4, N, sc_base, s_sn, gi)
            c11 = _fold(c11, q11, 1, blk, g, i4, N, sc_base, s_sn, gi)
            c21 = _fold(c21, q21, 2, blk, g, i4, N, sc_base, s_sn, gi)
            c31 = _fold(c31, q31, 3, blk, g, i4, N, sc_base, s_sn, gi)
    else:
        c00, c10, c20, c30, c01, c11, c21, c31 = q00, q10, q20, q30, q01, q11, q21, q31
    return c00, c10, c20, c30, c01, c11, c21, c31


@triton.jit
def _opaque(v):
    """v unchanged (an int32 register move) whose contiguity and divisibility Triton cannot see."""
    return tl.inline_asm_elementwise("mov.b32 $0, $1;", "=r,r", [v], dtype=tl.int32, is_pure=True, pack=1)


@triton.jit
def _task(
    x_ptr,
    dw_ptr,
    sc_ptr,
    out_ptr,
    order_ptr,
    s,
    start,
    seg_hi,
    rg,
    u_lo,
    u_hi,
    atomic,
    N,
    NB,
    n_steps,
    n_groups,
    s_xt,
    s_ds,
    s_ss,
    s_sn,
    s_ot,
    s_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WARPS: tl.constexpr,
    F16: tl.constexpr,
    DEPTH: tl.constexpr,
    STAGES: tl.constexpr,
    PAIRS: tl.constexpr,
    XDIRECT: tl.constexpr,
):
    """out[tokens start..seg_hi, rows of group rg] += their part of steps [u_lo, u_hi) of slot s
    (atomic adds if ``atomic``): each warp 64 rows (row block WARPS rg + warp)."""
    T: tl.constexpr = 32 * WARPS
    P: tl.constexpr = 3 if BITS == 4 else 2
    t = tl.arange(0, T)
    i4 = tl.arange(0, 4)
    lane = t % 32
    g = lane // 4
    p = lane % 4
    blk = rg * WARPS + t // 32
    blk_c = tl.minimum(blk, NB - 1)  # past the last block: read valid words, store nothing
    s64 = s.to(tl.int64)
    wb = dw_ptr + s64 * s_ds + (blk_c.to(tl.int64) * (n_steps * P * 128) + lane * 4)[:, None] + i4[None, :]
    m0 = start + g
    ok0 = m0 < seg_hi
    tok0 = tl.load(order_ptr + m0, mask=ok0, other=0)
    # a thread's B fragment of a 32-input sub-step: input pairs 2p + 8i (i = 0..3), i.e. int32
    # words 4p + i of ``permute_x``'s copy (one 16-byte load), or words p + 4i of x itself (XDIRECT)
    if XDIRECT:  # four 4-byte loads, the offsets hidden from Triton's contiguity analysis: it would
        # otherwise vectorize across lanes (p is contiguous along them) through a layout change,
        # which misaligned shared-memory accesses on the H200's triton 3.6
        xoff = _opaque(p[:, None] + 4 * i4[None, :])
    else:
        xoff = (4 * p)[:, None] + i4[None, :]
    xb0 = x_ptr + (tok0.to(tl.int64) * s_xt)[:, None] + xoff
    xm0 = ok0[:, None]
    ok1 = (m0 + 8 < seg_hi) & (BLOCK_M == 16)
    tok1 = tl.load(order_ptr + m0 + 8, mask=ok1, other=0)
    xb1 = x_ptr + (tok1.to(tl.int64) * s_xt)[:, None] + xoff
    xm1 = ok1[:, None]
    c00 = tl.zeros((T, 4), dtype=tl.float32)
    c10 = tl.zeros((T, 4), dtype=tl.float32)
    c20 = tl.zeros((T, 4), dtype=tl.float32)
    c30 = tl.zeros((T, 4), dtype=tl.float32)
    c01 = tl.zeros((T, 4), dtype=tl.float32)
    c11 = tl.zeros((T, 4), dtype=tl.float32)
    c21 = tl.zeros((T, 4), dtype=tl.float32)
    c31 = tl.zeros((T, 4), dtype=tl.float32)
    sc_base = sc_ptr + s64 * s_ss
    # software pipeline in registers (the last steps re-read the last one). DEPTH 1: step u + 1 is
    # in flight while step u is decoded and multiplied; 2: steps u + 1 and u + 2, rotated through
    # registers; 3 / 4: two / three buffers taking turns (the loop unrolled by 2 / 3), no moves
    last = u_hi - 1
    acc = (c00, c10, c20, c30, c01, c11, c21, c31)
    ld = (wb, xb0, xm0, xb1, xm1)
    cst = (blk, g, i4, N, sc_base, s_sn, n_groups)
    if STAGES > 0:  # Triton's pipeliner: a ring of STAGES steps in shared memory (cp.async)
        for u in tl.range(u_lo, u_hi, num_stages=STAGES):
            data = _load_step(*ld, u, BITS, BLOCK_M)
            acc = _step(acc, data, u, *cst, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, F16=F16)
    elif DEPTH >= 3:  # DEPTH - 1 buffers (nxt, two[, three]), each refilled right after its step
        NBUF: tl.constexpr = DEPTH - 1
        nxt = _load_step(*ld, u_lo, BITS, BLOCK_M)
        two = _load_step(*ld, tl.minimum(u_lo + 1, last), BITS, BLOCK_M)
        if DEPTH == 4:
            three = _load_step(*ld, tl.minimum(u_lo + 2, last), BITS, BLOCK_M)
        for u in range(u_lo, u_hi, NBUF):
            acc = _step(acc, nxt, u, *cst, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, F16=F16)
            nxt = _load_step(*ld, tl.minimum(u + NBUF, last), BITS, BLOCK_M)
            if u + 1 < u_hi:
                acc = _step(acc, two, u + 1, *cst, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, F16=F16)
            two = _load_step(*ld, tl.minimum(u + 1 + NBUF, last), BITS, BLOCK_M)
            if DEPTH == 4:
                if u + 2 < u_hi:
                    acc = _step(acc, three, u + 2, *cst, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, F16=F16)
                three = _load_step(*ld, tl.minimum(u + 2 + NBUF, last), BITS, BLOCK_M)
    elif DEPTH == 2:
        nxt = _load_step(*ld, u_lo, BITS, BLOCK_M)
        two = _load_step(*ld, tl.minimum(u_lo + 1, last), BITS, BLOCK_M)
        for u in range(u_lo, u_hi):
            cur = nxt
            nxt = two
            two = _load_step(*ld, tl.minimum(u + 2, last), BITS, BLOCK_M)
            acc = _step(acc, cur, u, *cst, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, F16=F16)
    else:
        nxt = _load_step(*ld, u_lo, BITS, BLOCK_M)
        for u in range(u_lo, u_hi):
            cur = nxt
            nxt = _load_step(*ld, tl.minimum(u + 1, last), BITS, BLOCK_M)
            acc = _step(acc, cur, u, *cst, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, F16=F16)
    c00, c10, c20, c30, c01, c11, c21, c31 = acc
    a = (start, seg_hi, N, s64, order_ptr, sc_ptr, s_ss, s_sn, out_ptr, s_ot, s_on, GROUP, atomic, PAIRS)
    _store_tile(c00, 0, 0, blk, g, p, i4, *a)
    _store_tile(c10, 1, 0, blk, g, p, i4, *a)
    _store_tile(c20, 2, 0, blk, g, p, i4, *a)
    _store_tile(c30, 3, 0, blk, g, p, i4, *a)
    if BLOCK_M == 16:
        _store_tile(c01, 0, 1, blk, g, p, i4, *a)
        _store_tile(c11, 1, 1, blk, g, p, i4, *a)
        _store_tile(c21, 2, 1, blk, g, p, i4, *a)
        _store_tile(c31, 3, 1, blk, g, p, i4, *a)


@triton.jit
def _sbmm24_kernel(
    x_ptr,
    dw_ptr,
    sc_ptr,
    out_ptr,
    order_ptr,
    seg_ptr,
    N,
    S,
    NB,
    n_steps,
    n_groups,
    s_xt,
    s_ds,
    s_ss,
    s_sn,
    s_ot,
    s_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    S_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    WARPS: tl.constexpr,
    F16: tl.constexpr,
    SPLIT: tl.constexpr,
    DEPTH: tl.constexpr,
    STAGES: tl.constexpr,
    STREAM: tl.constexpr,
    PAIRS: tl.constexpr,
    XDIRECT: tl.constexpr,
    MIXED: tl.constexpr,
):
    """x_ptr: ``permute_x(x)`` as int32 (bf16 pairs; x itself viewed as int32 if XDIRECT), dw_ptr:
    the slot layout as int32. One step = 64 inputs = 2 sparse mma k-steps per tile and token block
    of 8. A task = (work item, group of WARPS row blocks of 64). GROUP: 0 (row scale at the end) or
    a multiple of 64 (folded per step). DEPTH, STAGES: see ``_task``; PAIRS: ``_red_add``. Grids:
    - STREAM: (programs,), each runs an equal share of all tasks' steps (stream-K), in order;
      pieces of a task add atomically.
    - else (row groups x SPLIT, work items): one task per program, split-K over SPLIT programs
      (atomic adds if SPLIT > 1). The wrapper sizes the grid's rows for the items the batch may
      have (``max_items``).
    MIXED (BLOCK_M 16): work items of up to 16 tokens; those with at most 8 run the one-block code
    (a slot's 9-16 tokens make one item, its weights read once, and the others pay nothing)."""
    NG = tl.cdiv(NB, WARPS)
    args = (N, NB, n_steps, n_groups, s_xt, s_ds, s_ss, s_sn, s_ot, s_on)
    if STREAM:
        n_work = _segment_at(seg_ptr, S, S_P2, BLOCK_M, 0)[3]
        cur, hi = _stream_range(n_work * NG, n_steps)
        while cur < hi:
            w, rg, u_lo, u_hi, piece = _stream_task(cur, hi, n_steps, NG)
            s, start, seg_hi, _ = _segment_at(seg_ptr, S, S_P2, BLOCK_M, w)
            _task_of(
                x_ptr, dw_ptr, sc_ptr, out_ptr, order_ptr, s, start, seg_hi, rg, u_lo, u_hi, piece, *args,
                BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, WARPS=WARPS, F16=F16, DEPTH=DEPTH,
                STAGES=STAGES, PAIRS=PAIRS, XDIRECT=XDIRECT, MIXED=MIXED,
            )  # fmt: skip
            cur += u_hi - u_lo
    else:
        s, start, seg_hi, n_work = _segment(seg_ptr, S, S_P2, BLOCK_M)
        if tl.program_id(1) < n_work:
            per = tl.cdiv(n_steps, SPLIT)
            u_lo = (tl.program_id(0) % SPLIT) * per
            u_hi = tl.minimum(u_lo + per, n_steps)
            rg = tl.program_id(0) // SPLIT
            _task_of(
                x_ptr, dw_ptr, sc_ptr, out_ptr, order_ptr, s, start, seg_hi, rg, u_lo, u_hi, SPLIT > 1, *args,
                BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, WARPS=WARPS, F16=F16, DEPTH=DEPTH,
                STAGES=STAGES, PAIRS=PAIRS, XDIRECT=XDIRECT, MIXED=MIXED,
            )  # fmt: skip


@triton.jit
def _task_of(
    x_ptr, dw_ptr, sc_ptr, out_ptr, order_ptr, s, start, seg_hi, rg, u_lo, u_hi, atomic, N, NB, n_steps,
    n_groups, s_xt, s_ds, s_ss, s_sn, s_ot, s_on, BITS: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, WARPS: tl.constexpr, F16: tl.constexpr, DEPTH: tl.constexpr,
    STAGES: tl.constexpr, PAIRS: tl.constexpr, XDIRECT: tl.constexpr, MIXED: tl.constexpr,
):
    """``_task`` with BLOCK_M token rows, or (MIXED) with 8 where the item has at most 8 tokens."""
    tl.static_assert(not MIXED or BLOCK_M == 16, "mixed work items need BLOCK_M 16")
    a = (x_ptr, dw_ptr, sc_ptr, out_ptr, order_ptr, s, start, seg_hi, rg, u_lo, u_hi, atomic, N, NB)
    b = (n_steps, n_groups, s_xt, s_ds, s_ss, s_sn, s_ot, s_on)
    if MIXED and seg_hi - start <= 8:
        _task(*a, *b, BITS=BITS, GROUP=GROUP, BLOCK_M=8, WARPS=WARPS, F16=F16, DEPTH=DEPTH,
              STAGES=STAGES, PAIRS=PAIRS, XDIRECT=XDIRECT)  # fmt: skip
    else:
        _task(*a, *b, BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, WARPS=WARPS, F16=F16, DEPTH=DEPTH,
              STAGES=STAGES, PAIRS=PAIRS, XDIRECT=XDIRECT)  # fmt: skip


@triton.jit
def _interp_task(
    x_ptr,
    dw_ptr,
    sc_ptr,
    out_ptr,
    s,
    tok,
    m_mask,
    rb,
    u_lo,
    u_hi,
    N,
    K,
    n_steps,
    n_groups,
    s_xt,
    s_ds,
    s_ss,
    s_sn,
    s_ot,
    s_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out[tok, rows of block rb] += their part of steps [u_lo, u_hi) of slot s: each step's
    [BLOCK_N, 64] weights are gathered from the layout by the same lane / tile / register mapping
    mma.sp reads, then one fp32 dot with the (unpermuted) x tile. The interpreter runs programs one
    at a time, so pieces of a stream-K task need no atomics here (it has none for bf16 either)."""
    P: tl.constexpr = 3 if BITS == 4 else 2
    Z2: tl.constexpr = 15 if BITS == 4 else 3
    row = rb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = row < N
    blk = row // 64
    r = (row % 64) // 16
    h_r = (row % 16) // 8
    g = row % 8
    kin = tl.arange(0, 64)
    gk = kin // 4
    d = kin % 4
    kk = gk // 8
    h_j = (gk % 8) // 4
    pj = gk % 4
    i = h_r[:, None] + 2 * h_j[None, :]
    s64 = s.to(tl.int64)
    base = dw_ptr + s64 * s_ds + (blk * (n_steps * P * 128))[:, None]
    if BITS == 4:
        cpos = kk[None, :] * 128 + (4 * g[:, None] + pj[None, :]) * 4 + r[:, None]
        o = 4 * i
    else:
        cpos = (4 * g[:, None] + pj[None, :]) * 4 + r[:, None]
        o = 2 * (4 * kk[None, :] + i)
    mpos = (P - 1) * 128 + (4 * g[:, None] + 2 * (r[:, None] % 2) + h_j[None, :]) * 4
    mpos = mpos + 2 * kk[None, :] + r[:, None] // 2
    msh = 16 * h_r[:, None] + 4 * pj[None, :]
    fmask: tl.constexpr = 15 if BITS == 4 else 3
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for u in range(u_lo, u_hi):
        wp = base + u * (P * 128)
        cw = tl.load(wp + cpos, mask=n_mask[:, None], other=0)
        mw = tl.load(wp + mpos, mask=n_mask[:, None], other=4)
        c0 = (cw >> o) & fmask
        c1 = (cw >> (o + 16)) & fmask
        nib = (mw >> msh) & 15
        v = tl.where(d[None, :] == (nib & 3), 2 * c0 - Z2, tl.where(d[None, :] == (nib >> 2), 2 * c1 - Z2, 0))
        kx = u * 64 + kin
        xt = tl.load(
            x_ptr + tok[None, :] * s_xt + kx[:, None], mask=(kx < K)[:, None] & m_mask[None, :], other=0.0
        )
        part = tl.dot(v.to(tl.float32), xt.to(tl.float32), input_precision="ieee")
        if GROUP > 0:
            gi = tl.minimum((u * 64) // GROUP, n_groups - 1)
            acc += part * tl.load(sc_ptr + s64 * s_ss + row * s_sn + gi, mask=n_mask, other=0.0)[:, None]
        else:
            acc += part
    if GROUP == 0:
        acc = acc * tl.load(sc_ptr + s64 * s_ss + row * s_sn, mask=n_mask, other=0.0)[:, None]
    o_ptrs = out_ptr + tok[None, :] * s_ot + row[:, None] * s_on
    o_mask = n_mask[:, None] & m_mask[None, :]
    prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
    tl.store(o_ptrs, (prev.to(tl.float32) + 0.5 * acc).to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _sbmm24_interp_kernel(
    x_ptr,
    dw_ptr,
    sc_ptr,
    out_ptr,
    order_ptr,
    seg_ptr,
    N,
    K,
    S,
    n_steps,
    n_groups,
    s_xt,
    s_ds,
    s_ss,
    s_sn,
    s_ot,
    s_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    S_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    STREAM: tl.constexpr,
):
    """The same op without asm (for TRITON_INTERPRET=1), on the same grids as ``_sbmm24_kernel``
    (tasks of BLOCK_N rows; no split-K)."""
    args = (N, K, n_steps, n_groups, s_xt, s_ds, s_ss, s_sn, s_ot, s_on)
    if STREAM:
        NG = tl.cdiv(N, BLOCK_N)
        n_work = _segment_at(seg_ptr, S, S_P2, BLOCK_M, 0)[3]
        cur, hi = _stream_range(n_work * NG, n_steps)
        while cur < hi:
            w, rb, u_lo, u_hi, _ = _stream_task(cur, hi, n_steps, NG)
            s, start, seg_hi, _ = _segment_at(seg_ptr, S, S_P2, BLOCK_M, w)
            offs_m = start + tl.arange(0, BLOCK_M)
            m_mask = offs_m < seg_hi
            tok = tl.load(order_ptr + offs_m, mask=m_mask, other=0)
            _interp_task(
                x_ptr, dw_ptr, sc_ptr, out_ptr, s, tok, m_mask, rb, u_lo, u_hi, *args,
                BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            )  # fmt: skip
            cur += u_hi - u_lo
    else:
        s, tok, m_mask, n_work = _work_item(seg_ptr, order_ptr, S, S_P2, BLOCK_M)
        if tl.program_id(1) < n_work:
            rb = tl.program_id(0)
            _interp_task(
                x_ptr, dw_ptr, sc_ptr, out_ptr, s, tok, m_mask, rb, 0, n_steps, *args,
                BITS=BITS, GROUP=GROUP, BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N,
            )  # fmt: skip


class Config(NamedTuple):
    """Launch configuration: tokens per work item (8 or 16: one or two mma token blocks), warps per
    program (each warp 64 output rows), split-K factor (pieces add into out with reductions),
    ``depth``: steps loaded ahead in registers (1, 2; 3 / 4: two / three buffers taking turns, see
    ``_task``), ``stream``: programs per SM of a stream-K grid (0: one task per program), a
    register cap (ptxas ``maxnreg``) so that that many programs fit on an SM at once, and
    ``stages``: > 0 replaces the register pipeline by a ring of that many steps in shared memory
    (Triton's pipeliner: cp.async; ~55 registers instead of 90-106). ``xdirect``: read x's B
    fragments from x itself (4 four-byte loads) instead of a permuted copy made per call (one
    kernel less; K a multiple of 64). ``mixed`` (block_m 16): an item of at most 8 tokens runs the
    one-block code, so a slot's 9-16 tokens are one item without costing the small ones a second
    mma per tile."""

    block_m: int
    num_warps: int = 4
    split: int = 1
    depth: int = 2
    stream: int = 0
    maxnreg: int | None = None
    stages: int = 0
    xdirect: bool = False
    mixed: bool = False


# Candidates for Hopper (benchmarks/NOTES-sbmm.md, v6: the H200 sweep of every config on the 30
# target cases, run G of 2026-11-28 session 5). Once pieces of a task add with packed reductions
# (``_red_add``) instead of compare-and-swap loops, split-K wins most cases: split 2 with depth 3
# won 10, split 2-8 with a shared-memory ring 12, one task per program 7 (ring 4: 2, depth 3 / 4:
# 4, depth 1: 1), stream-K 1; the tuner's pick is within 1.07x of the best. More pieces round the
# 16-bit output more often (max rel err vs the fp32 reference: 1 piece 0.2-0.3 %, 2: 0.4-0.5 %,
# 4: 0.5-0.6 %, 8: 0.6-1.0 %, 16: 0.8-1.2 %), so the decode lists stop at 4 pieces, split 8 is
# kept for few live slots (where it makes B = 1 2.2-2.6x faster) and split 16 is gone. BM 16 when
# slots hold many tokens. ``xdirect`` configs (x read as it is, no permute kernel; session 6's
# sweep, after the permute became one Triton launch): they win small calls (B = 1 on 4096^2:
# 7.3-7.6 us against 8.1-8.5; 4-bit 4096^2 N = 16 by 0.6-2.5 us) and lose the rest by 2-36 %
# (four 4-byte loads per fragment), so the tuner picks per case. ``mixed`` configs (session 9's
# quick sweep): split 2 depth 3 and split 2 ring 4 won 5 of the 12 N = 16 cases, by 2-6 % over
# the best other config and up to 20 % over their plain twins (B = 32 as well, where no item
# takes the second token block), and lost 2-10 % at N >= 32.
DECODE_CONFIGS = [
    Config(8, 4, depth=3),
    Config(8, 4, depth=4),
    Config(8, 4, depth=1),
    Config(16, 4, depth=3),
    Config(8, 4, 2, depth=3),
    Config(8, 4, stages=4),
    Config(8, 4, stages=8),
    Config(8, 2, stages=8),
    Config(16, 4, stages=6),
    Config(8, 4, 2, stages=4),
    Config(8, 2, 2, stages=4),
    Config(8, 4, 4, stages=3),
    Config(8, 4, 2, depth=3, xdirect=True),
    Config(8, 4, depth=4, xdirect=True),
    Config(16, 4, 2, depth=3, mixed=True),
    Config(16, 2, 2, stages=4, mixed=True),
]
STREAM_CONFIGS = [
    Config(8, 4, depth=3, stream=5, maxnreg=96),
    Config(8, 4, depth=3, stream=4),
    Config(8, 4, depth=1, stream=6, maxnreg=80),
    Config(8, 1, depth=3, stream=16, maxnreg=96),
    Config(8, 4, stream=3, stages=6),
]
SPLIT_CONFIGS = [
    Config(16, 2, 8),
    Config(8, 2, 8, stages=3),
    Config(8, 1, 8, stages=4),
    Config(8, 1, 8, stages=4, xdirect=True),
]
PREFILL_CONFIGS = [Config(16, 4, depth=3), Config(16, 8), Config(16, 4)]
# Not picked by the tuner until measured: the benchmark checks them against the reference and
# times them in its sweep, the GPU tests run them. Now: the mixed configs that did not win a case
# in session 9's sweeps (NOTES-sbmm.md v10).
TRIAL_CONFIGS: list[Config] = [
    Config(16, 4, 4, stages=3, mixed=True),
    Config(16, 4, stream=3, stages=6, mixed=True),
    Config(16, 4, depth=3, mixed=True),
]
INTERPRET_BLOCK = (16, 32)  # (tokens, rows) per program of the interpreter kernel
TUNER = Tuner(graph=True)


@triton.jit
def _src_word(j):
    """The int32 word (a bf16/fp16 pair) of x that lands at word j of ``permute_x``'s copy:
    16 (j // 16) + (j % 16) // 4 + 4 (j % 4), inside j's block of 16 words."""
    w = j % 16
    return j - w + w // 4 + 4 * (w % 4)


@triton.jit
def _permute_x_kernel(x_ptr, out_ptr, kw, W, s_x, s_o, BLOCK: tl.constexpr):
    """out[t, j] = x[t, _src_word(j)] for int32 words j < W (bf16/fp16 pairs; 0 past x's kw
    words). Grid: (tokens, word blocks)."""
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    src = _src_word(j)  # same block of 16 words: src >= kw wherever j >= W
    v = tl.load(x_ptr + t * s_x + src, mask=src < kw, other=0)
    tl.store(out_ptr + t * s_o + j, v, mask=j < W)


def permute_x(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, k] -> int32 [T, steps * 32] (bf16/fp16 pairs), zero-padded to whole steps of 64, each
    32 inputs reordered so that a thread's B fragment of mma.sp is 16 contiguous bytes: pair
    (2 p + 8 i, +1) of a sub-step moves to int32 word 4 p + i. One Triton launch (on CUDA or under
    the interpreter) where x is contiguous, k even and x 4-byte aligned; else ``permute_x_torch``."""
    if not (x.is_cuda or interpreting()) or k % 2 or not x.is_contiguous() or x.data_ptr() % 4:
        return permute_x_torch(x, k)
    t, w = x.shape[0], L.n_steps(k) * 32
    out = torch.empty(t, w, dtype=torch.int32, device=x.device)
    if t:
        block = min(1024, next_pow2(w))
        xw = x.reshape(-1).view(torch.int32)  # [T * k / 2] (a view)
        _permute_x_kernel[(t, triton.cdiv(w, block))](xw, out, k // 2, w, k // 2, w, BLOCK=block)
    return out


permute_x_torch = L.permute_x_torch  # the reference of permute_x (torch ops)


def _rotated_plans(slot: torch.Tensor, n_slots: int, n: int = 4) -> list[Plan]:
    """Plans of ``slot`` with its slot ids rotated n ways over the S slots (the same spread on other
    deltas, so that timing a config reads cold weights, as a step over many variants does)."""
    live = (slot >= 0) & (slot < n_slots)
    step = max(1, n_slots // n)
    return [plan(torch.where(live, (slot + r * step) % n_slots, slot), n_slots) for r in range(n)]


def tune_key(dtype, k, n, bits, group_size, n_slots, t, active=None, given_perm=False) -> tuple:
    """Autotuning key: shape, layout, slot count, batch-size class and the class of the number of
    slots the batch can touch: at most the live slots (``active``, a host-side hint) and at most
    one per token, so a decode step of a few tokens is tuned as such with no device read; and
    whether the caller gives the permuted x (then the permute is not part of a call's time)."""
    live = batch_class(touched(n_slots, t, active))
    return ("sbmm24", dtype, k, n, bits, group_size, n_slots, batch_class(t), live, given_perm)


def touched(n_slots: int, t: int, active: int | None = None) -> int:
    """An upper bound on the distinct slots of a batch of t tokens (``active``: live slots)."""
    return min(active or n_slots, t)


def max_items(n_slots: int, t: int, block_m: int, active: int | None = None) -> int:
    """An upper bound on the work items (a slot's tokens in blocks of block_m) of t tokens over at
    most ``touched`` slots, each of whose last block may be partial: the grid's rows."""
    return (t + touched(n_slots, t, active) * (block_m - 1)) // block_m


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
    plan_: Plan | None = None,
    config: Config | None = None,
    active: int | None = None,
    x_perm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with 0 <= slot[t] < S.

    Shape: x [T, k] fp16/bf16; dw [S, N, W] int16 (``layout.to_device_layout`` of 2:4 2/4-bit
    parts); scales [S, N, G] fp32; slot [T] int32; out [T, N] in x's dtype (zeros if None).
    ``active``: at most how many distinct slots the tokens use (the engine knows it on the host):
    it sizes the grid (``max_items``) and the autotuning key, and tokens of more slots than that
    may get no delta; None: S. ``x_perm``: ``permute_x(x, k)``
    int32 [T, steps * 32] where the caller already has it (layers that read one input share it);
    configs that read x itself ignore it.
    """
    lay = L.QuantLayout(bits=bits, sparsity="2:4", group_size=group_size)
    if not L.supported(lay):
        raise CodecError(f"the slot-layout kernel does not read {lay}")
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeMismatchError(f"x must be fp16/bf16 [T, {k}], got {x.dtype} {tuple(x.shape)}")
    n_slots, n = dw.shape[:2] if dw.dim() == 3 else (0, 0)
    if dw.dim() != 3 or dw.dtype != torch.int16 or tuple(dw.shape[1:]) != L.device_shape(lay, n, k):
        raise ShapeMismatchError(
            f"dw must be int16 [S, N, W] as layout.device_shape gives, got {dw.dtype} {tuple(dw.shape)}"
        )
    if tuple(scales.shape) != (n_slots, n, lay.n_groups(k)) or scales.dtype != torch.float32:
        raise ShapeMismatchError(
            f"scales must be float32 {(n_slots, n, lay.n_groups(k))}, got {tuple(scales.shape)}"
        )
    if slot.shape != (x.shape[0],):
        raise ShapeMismatchError(f"slot must be [{x.shape[0]}], got {tuple(slot.shape)}")
    t = x.shape[0]
    if x_perm is not None and (x_perm.shape != (t, L.n_steps(k) * 32) or x_perm.dtype != torch.int32):
        raise ShapeMismatchError(
            f"x_perm must be permute_x(x, k): int32 [{t}, {L.n_steps(k) * 32}], "
            f"got {x_perm.dtype} {tuple(x_perm.shape)}"
        )
    if out is None:
        out = torch.zeros(t, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (t, n) or out.dtype != x.dtype:
        raise ShapeMismatchError(f"out must be {x.dtype} [{t}, {n}], got {out.dtype} {tuple(out.shape)}")
    check_device(x, dw, scales, slot, out, *([] if x_perm is None else [x_perm]))
    if active is not None and not 1 <= active <= n_slots:
        raise ShapeMismatchError(f"active must be in 1..{n_slots} (the slots a batch may use), got {active}")
    if t == 0 or n_slots == 0:
        return out
    dw = dw.contiguous()
    x = x.contiguous()
    p = plan(slot, n_slots) if plan_ is None else plan_
    check_plan(p, t, n_slots)
    steps = L.n_steps(k)
    if interpreting():  # a config's stream grid is kept (programs per SM x 1 SM), the rest ignored
        bm, bn = INTERPRET_BLOCK
        dw32 = dw.view(torch.int32)
        stream = config.stream if config is not None else 0
        grid = (stream,) if stream else (triton.cdiv(n, bn), max_items(n_slots, t, bm, active))
        _sbmm24_interp_kernel[grid](
            x, dw32, scales, out, p.order, p.seg, n, k, n_slots, steps, scales.shape[2], x.stride(0),
            dw32.stride(0), scales.stride(0), scales.stride(1), out.stride(0), out.stride(1),
            BITS=bits, GROUP=group_size or 0, S_P2=max(64, next_pow2(n_slots)), BLOCK_M=bm, BLOCK_N=bn,
            STREAM=stream > 0,
        )  # fmt: skip
        return out

    f16 = x.dtype == torch.float16

    def launch(c: Config, o: torch.Tensor, p: Plan = p) -> None:
        direct = c.xdirect and k % L.STEP_K == 0 and x.data_ptr() % 4 == 0
        if direct:
            xk = x.reshape(-1).view(torch.int32)  # rows: k / 2
        else:
            xk = permute_x(x, k) if x_perm is None else x_perm.contiguous()  # rows: steps * 32
        # split / stream pieces add 2 adjacent rows per reduction where out allows it (_red_add)
        pairs = o.stride(1) == 1 and o.stride(0) % 2 == 0 and n % 2 == 0 and o.data_ptr() % 4 == 0
        dw32 = dw.view(torch.int32)
        nb = L.n_blocks(n)
        if c.stream:
            grid = (c.stream * n_sms(x.device),)
        else:
            grid = (triton.cdiv(nb, c.num_warps) * c.split, max_items(n_slots, t, c.block_m, active))
        _sbmm24_kernel[grid](
            xk, dw32, scales, o, p.order, p.seg, n, n_slots, nb, steps, scales.shape[2], xk.numel() // t,
            dw32.stride(0), scales.stride(0), scales.stride(1), o.stride(0), o.stride(1),
            BITS=bits, GROUP=group_size or 0, S_P2=max(64, next_pow2(n_slots)), BLOCK_M=c.block_m,
            WARPS=c.num_warps, F16=f16, SPLIT=c.split, DEPTH=c.depth,
            STAGES=c.stages, STREAM=c.stream > 0, PAIRS=pairs, XDIRECT=direct, MIXED=c.mixed,
            num_warps=c.num_warps,
            num_stages=max(1, c.stages), maxnreg=c.maxnreg,
        )  # fmt: skip

    if config is None:
        key = tune_key(x.dtype, k, n, bits, group_size, n_slots, t, active, x_perm is not None)
        if t > 256:
            cands = PREFILL_CONFIGS
        else:  # split-K only pays when few (slot, token block) items leave SMs idle
            few = touched(n_slots, t, active) <= 8
            cands = DECODE_CONFIGS + STREAM_CONFIGS + (SPLIT_CONFIGS if few else [])
        if x_perm is not None:  # reading x itself only saves the permute, which is given here
            cands = [c for c in cands if not c.xdirect]
        config = TUNER.best.get(key)
        if config is None:  # timed as the engine runs it: back to back in a CUDA graph, other slots each call
            scratch, rotated = torch.empty_like(out), _rotated_plans(slot, n_slots)
            config = TUNER.pick(key, cands, lambda c: [launch(c, scratch, rp) for rp in rotated])
    launch(config, out)
    return out

"""SBMM on the GPU slot layout (kernels/layout.py): 2:4 deltas with 2- or 4-bit codes.

Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with 0 <= slot[t] < S.

Phase decomposition instead of placing the 2:4 pairs into a dense tile: with D_j[n, g] the dense
weight at input 4g + j, ``y = sum_j D_j @ x[:, j::4]ᵀ``. A unit (64 groups) is three (4-bit) or two
(2-bit) [BN, 16] int16 tiles; every D tile of sub-phase s and phase j is an elementwise function of
them with compile-time shifts, so Triton keeps it in registers in the tensor-core operand layout and
each unit is 16 ``tl.dot`` of K = 16. On CUDA the decode is one PTX block per pair of groups
(``tl.inline_asm_elementwise``, pack=2: two 16-bit lanes per 32-bit register, packed bf16/fp16 ops):
a code becomes ``2 (c - z)`` exactly by a shift, one LOP3 into the mantissa of 129 and one packed
FMA (the factor 1/2 goes into the row scale); the keep-mask bits become 0xFFFF lane masks by PRMT's
sign-replicate mode, and LOP3s select. Under TRITON_INTERPRET=1 (no asm) the same values are
computed with plain Triton ops (``ASM=False``), which the CPU tests check.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deltahub.errors import CodecError, ShapeMismatchError

from . import layout as L
from ._common import Plan, Tuner, batch_class, check_device, check_plan, interpreting, next_pow2, plan
from .dequant_triton import _work_item


def _decode_asm(bits: int, f16: bool, s: int) -> str:
    """PTX for sub-phase s of one pair of groups: inputs $4 (the code word), $5 (the mask word),
    outputs $0..$3 (D of phase j), each a pair of packed 16-bit floats (one per 16-bit lane)."""
    magic, one = ("0x64016401", "0x3C003C00") if f16 else ("0x43014301", "0x3F803F80")
    # 129 + 2c - (129 + 2z) = 2 (c - z); 144 / 132 and 1040 / 1028 are exact in bf16 / fp16
    neg = {(4, False): "0xC310C310", (2, False): "0xC304C304", (4, True): "0xE410E410"}
    neg[(2, True)] = "0xE404E404"
    fma = "fma.rn.f16x2" if f16 else "fma.rn.bf16x2"
    out = ["{", ".reg .b32 %t, %one, %neg, %v<2>, %q<2>, %m<4>;", f"mov.b32 %one, {one};"]
    out.append(f"mov.b32 %neg, {neg[(bits, f16)]};")
    field = 0x001E001E if bits == 4 else 0x00060006
    for v in range(2):  # the code moves to lane bits 1-4 (1-2), under the exponent of 128
        o = 8 * (s % 2) + 4 * v if bits == 4 else 4 * s + 2 * v
        # shifts as multiplies (IMAD, FMA pipe): the ALU pipe carries the LOP3s and PRMTs
        out.append("mul.lo.u32 %t, $4, 2;" if o == 0 else f"mul.hi.u32 %t, $4, {1 << (33 - o)};")
        out.append(f"lop3.b32 %t, %t, {field:#010x}, {magic}, 0xEA;")  # (t & field) | magic
        out.append(f"{fma} %v{v}, %t, %one, %neg;")
    for h in range(2):  # P << (2s + h): mask bits of j = 2h, 2h + 1 at bit 7 / 15 of each lane
        k = 2 * s + h
        out.append(f"mov.b32 %q{h}, $5;" if k == 0 else f"mul.lo.u32 %q{h}, $5, {1 << k};")
    for j in range(4):
        assert L.mask_bit(s, j) + 2 * s + j // 2 == (7 if j % 2 == 0 else 15)
        sel = "0xBB99" if j % 2 else "0xAA88"  # bytes 0,1 <- msb of byte 0 (1); bytes 2,3 <- of 2 (3)
        out.append(f"prmt.b32 %m{j}, %q{j // 2}, %q{j // 2}, {sel};")
    out.append("and.b32 $0, %v0, %m0;")
    out.append("lop3.b32 %t, %v0, %v1, %m0, 0xD8;")  # m0 ? v1 : v0
    out.append("and.b32 $1, %t, %m1;")
    out.append("lop3.b32 %t, %v1, %v0, %m3, 0xD8;")  # m3 ? v0 : v1
    out.append("and.b32 $2, %t, %m2;")
    out.append("and.b32 $3, %v1, %m3;")
    out.append("}")
    return "\n".join(out)


CONSTRAINTS: tl.constexpr = tl.constexpr("=r,=r,=r,=r,r,r")
ASM4_BF16_0: tl.constexpr = tl.constexpr(_decode_asm(4, False, 0))
ASM4_BF16_1: tl.constexpr = tl.constexpr(_decode_asm(4, False, 1))
ASM4_BF16_2: tl.constexpr = tl.constexpr(_decode_asm(4, False, 2))
ASM4_BF16_3: tl.constexpr = tl.constexpr(_decode_asm(4, False, 3))
ASM4_F16_0: tl.constexpr = tl.constexpr(_decode_asm(4, True, 0))
ASM4_F16_1: tl.constexpr = tl.constexpr(_decode_asm(4, True, 1))
ASM4_F16_2: tl.constexpr = tl.constexpr(_decode_asm(4, True, 2))
ASM4_F16_3: tl.constexpr = tl.constexpr(_decode_asm(4, True, 3))
ASM2_BF16_0: tl.constexpr = tl.constexpr(_decode_asm(2, False, 0))
ASM2_BF16_1: tl.constexpr = tl.constexpr(_decode_asm(2, False, 1))
ASM2_BF16_2: tl.constexpr = tl.constexpr(_decode_asm(2, False, 2))
ASM2_BF16_3: tl.constexpr = tl.constexpr(_decode_asm(2, False, 3))
ASM2_F16_0: tl.constexpr = tl.constexpr(_decode_asm(2, True, 0))
ASM2_F16_1: tl.constexpr = tl.constexpr(_decode_asm(2, True, 1))
ASM2_F16_2: tl.constexpr = tl.constexpr(_decode_asm(2, True, 2))
ASM2_F16_3: tl.constexpr = tl.constexpr(_decode_asm(2, True, 3))


@triton.jit
def _decode(cw, pw, s: tl.constexpr, BITS: tl.constexpr, F16: tl.constexpr):
    """PTX decode of sub-phase s: (D_0, D_1, D_2, D_3), each [BN, 16] fp16 (F16) or bf16."""
    if BITS == 4 and not F16 and s == 0:
        asm: tl.constexpr = ASM4_BF16_0
    elif BITS == 4 and not F16 and s == 1:
        asm: tl.constexpr = ASM4_BF16_1
    elif BITS == 4 and not F16 and s == 2:
        asm: tl.constexpr = ASM4_BF16_2
    elif BITS == 4 and not F16 and s == 3:
        asm: tl.constexpr = ASM4_BF16_3
    elif BITS == 4 and F16 and s == 0:
        asm: tl.constexpr = ASM4_F16_0
    elif BITS == 4 and F16 and s == 1:
        asm: tl.constexpr = ASM4_F16_1
    elif BITS == 4 and F16 and s == 2:
        asm: tl.constexpr = ASM4_F16_2
    elif BITS == 4 and F16 and s == 3:
        asm: tl.constexpr = ASM4_F16_3
    elif BITS == 2 and not F16 and s == 0:
        asm: tl.constexpr = ASM2_BF16_0
    elif BITS == 2 and not F16 and s == 1:
        asm: tl.constexpr = ASM2_BF16_1
    elif BITS == 2 and not F16 and s == 2:
        asm: tl.constexpr = ASM2_BF16_2
    elif BITS == 2 and not F16 and s == 3:
        asm: tl.constexpr = ASM2_BF16_3
    elif BITS == 2 and F16 and s == 0:
        asm: tl.constexpr = ASM2_F16_0
    elif BITS == 2 and F16 and s == 1:
        asm: tl.constexpr = ASM2_F16_1
    elif BITS == 2 and F16 and s == 2:
        asm: tl.constexpr = ASM2_F16_2
    elif BITS == 2 and F16 and s == 3:
        asm: tl.constexpr = ASM2_F16_3
    if F16:
        d = tl.inline_asm_elementwise(
            asm, CONSTRAINTS, [cw, pw], dtype=(tl.float16,) * 4, is_pure=True, pack=2
        )
    else:
        d = tl.inline_asm_elementwise(
            asm, CONSTRAINTS, [cw, pw], dtype=(tl.bfloat16,) * 4, is_pure=True, pack=2
        )
    return d


@triton.jit
def _phase(cw, pw, s: tl.constexpr, j: tl.constexpr, BITS: tl.constexpr):
    """Plain-Triton decode of D (sub-phase s, phase j) as float32 [BN, 16]: 2 (c - z) or 0."""
    if BITS == 4:
        o: tl.constexpr = 8 * (s % 2)
        fw: tl.constexpr = 4
    else:
        o: tl.constexpr = 4 * s
        fw: tl.constexpr = 2
    v0 = (2 * ((cw >> o) & ((1 << fw) - 1)) - ((1 << fw) - 1)).to(tl.float32)
    v1 = (2 * ((cw >> (o + fw)) & ((1 << fw) - 1)) - ((1 << fw) - 1)).to(tl.float32)
    # bit of "position q kept" in sub-phase s: layout.mask_bit(s, q)
    m0 = ((pw >> (7 - 2 * s)) & 1) != 0
    m1 = ((pw >> (15 - 2 * s)) & 1) != 0
    m2 = ((pw >> (6 - 2 * s)) & 1) != 0
    m3 = ((pw >> (14 - 2 * s)) & 1) != 0
    if j == 0:
        d = tl.where(m0, v0, 0.0)
    elif j == 3:
        d = tl.where(m3, v1, 0.0)
    elif j == 1:
        d = tl.where(m1, tl.where(m0, v1, v0), 0.0)
    else:
        d = tl.where(m2, tl.where(m3, v0, v1), 0.0)
    return d


@triton.jit
def _x_tile(xb, kk, K, EVEN: tl.constexpr):
    """x^T rows kk [16] for the tile's tokens -> [16, BM] (base pointers xb [1, BM], unit K stride
    folded into the address when the compiler specialises it)."""
    if EVEN:
        return tl.load(xb + kk[:, None])
    else:
        return tl.load(xb + kk[:, None], mask=(kk < K)[:, None], other=0.0)


@triton.jit
def _sbmm24_kernel(
    x_ptr,
    dw_ptr,
    sc_ptr,
    out_ptr,
    order_ptr,
    seg_ptr,
    N,
    K,
    S,
    n_units,
    n_groups,
    s_xt,
    s_ds,
    s_dn,
    s_ss,
    s_sn,
    s_ot,
    s_on,
    BITS: tl.constexpr,
    GROUP: tl.constexpr,
    S_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ASM: tl.constexpr,
    F16: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN: tl.constexpr,
    SPLIT: tl.constexpr,
    XPERM: tl.constexpr,
):
    """Grid (output blocks x SPLIT, work items); one K step per unit of 256 inputs. GROUP: 0 (scale
    per row, applied at the end) or >= 64 (one scale per sub-phase, applied to its partial
    product). SPLIT > 1: split-K, each program takes a range of units and adds its partial product
    with an atomic add (so one slot still fills the GPU). x must have unit stride along K; XPERM:
    x is ``permute_x(x)`` (zero-padded to whole units), so each x tile is one contiguous load."""
    s, tok, m_mask, n_work = _work_item(seg_ptr, order_ptr, S, S_P2, BLOCK_M)
    if tl.program_id(1) >= n_work:
        return
    nb = tl.program_id(0) // SPLIT
    u_lo = 0
    u_hi = n_units
    if SPLIT > 1:
        per = tl.cdiv(n_units, SPLIT)
        u_lo = (tl.program_id(0) % SPLIT) * per
        u_hi = tl.minimum(u_lo + per, n_units)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    s64 = s.to(tl.int64)
    WPU: tl.constexpr = 48 if BITS == 4 else 32
    w = tl.arange(0, 16)
    rows = dw_ptr + s64 * s_ds + offs_n.to(tl.int64)[:, None] * s_dn + w[None, :]
    sc_rows = sc_ptr + s64 * s_ss + offs_n * s_sn
    xb = x_ptr + tok.to(tl.int64)[None, :] * s_xt
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for u in range(u_lo, u_hi):
        ptr = rows + u * WPU
        c_a = tl.load(ptr, mask=n_mask[:, None], other=0)
        if BITS == 4:
            c_b = tl.load(ptr + 16, mask=n_mask[:, None], other=0)
            p_w = tl.load(ptr + 32, mask=n_mask[:, None], other=0)
        else:
            c_b = c_a
            p_w = tl.load(ptr + 16, mask=n_mask[:, None], other=0)
        kb = u * 256 + 4 * w
        for sp in tl.static_range(4):
            if GROUP > 0:
                part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
            else:
                part = acc
            if BITS == 4 and sp >= 2:
                cw = c_b.to(tl.int32) & 0xFFFF
            else:
                cw = c_a.to(tl.int32) & 0xFFFF
            pw = p_w.to(tl.int32) & 0xFFFF
            if ASM:
                if BITS == 4 and sp >= 2:
                    d = _decode(c_b, p_w, sp, BITS, F16)
                else:
                    d = _decode(c_a, p_w, sp, BITS, F16)
            for j in tl.static_range(4):
                if XPERM:  # x permuted by the wrapper: phase (sp, j) of the unit is 16 inputs in a row
                    xt = tl.load(xb + (u * 256 + 16 * (4 * sp + j) + w)[:, None])
                else:
                    xt = _x_tile(xb, kb + (64 * sp + j), K, EVEN)
                if ASM:
                    part = tl.dot(d[j], xt, part)
                elif IEEE:
                    part = tl.dot(
                        _phase(cw, pw, sp, j, BITS), xt.to(tl.float32), part, input_precision="ieee"
                    )
                else:
                    part = tl.dot(_phase(cw, pw, sp, j, BITS).to(xt.dtype), xt, part)
            if GROUP > 0:
                g = tl.minimum((u * 256 + 64 * sp) // GROUP, n_groups - 1)  # past K: part is 0
                acc += part * tl.load(sc_rows + g, mask=n_mask, other=0.0)[:, None]
            else:
                acc = part
    if GROUP == 0:
        acc = acc * tl.load(sc_rows, mask=n_mask, other=0.0)[:, None]
    o_ptrs = out_ptr + tok[None, :] * s_ot + offs_n[:, None] * s_on
    o_mask = n_mask[:, None] & m_mask[None, :]
    if SPLIT > 1:
        tl.atomic_add(o_ptrs, (0.5 * acc).to(out_ptr.dtype.element_ty), mask=o_mask, sem="relaxed")
    else:
        prev = tl.load(o_ptrs, mask=o_mask, other=0.0)
        tl.store(o_ptrs, (prev.to(tl.float32) + 0.5 * acc).to(out_ptr.dtype.element_ty), mask=o_mask)


class Config(NamedTuple):
    """Launch configuration: tokens per tile, output rows per tile, warps (2: mma.sync, A and B
    from registers; 4, 8: wgmma), pipeline stages, split-K factor (atomic adds into out), x
    permuted once per call (one more small launch; contiguous x tiles), register cap."""

    block_m: int
    block_n: int
    num_warps: int = 4
    num_stages: int = 2
    split: int = 1
    xperm: bool = False
    maxnreg: int | None = None


# Candidates for Hopper, from the SASS count per stored value and the registers (benchmarks/
# sass_sbmm.py) and the H200 runs (NOTES-sbmm.md): 1-2 warps (mma.sync, the decoded tiles stay in
# registers) won every decode case over wgmma; x permuted per call saves ~13 % of the instructions
# for one more small launch. Few live slots add split-K variants.
DECODE_CONFIGS = [
    Config(16, 128, 2, 2, xperm=True),
    Config(16, 64, 2, 3, xperm=True),
    Config(16, 64, 1, 2, xperm=True),
    Config(16, 128, 2, 2),
]
SPLIT_CONFIGS = [Config(16, 128, 2, 2, 4, xperm=True), Config(16, 128, 2, 2, 4), Config(16, 128, 4, 2, 8)]
PREFILL_CONFIGS = [Config(64, 128, 4, 2, xperm=True), Config(64, 128, 4, 2)]
INTERPRET_CONFIG = Config(16, 32, 4, 1)
TUNER = Tuner()


def permute_x(x: torch.Tensor, k: int) -> torch.Tensor:
    """x [T, k] -> [T, units * 256], zero-padded, input 64s + 4w + j of each unit moved to
    16 (4s + j) + w: the inputs phase j of sub-phase s meets, in a row."""
    units = L.n_units(k)
    if units * L.UNIT_K != k:
        x = torch.nn.functional.pad(x, (0, units * L.UNIT_K - k))
    t = x.shape[0]
    return x.reshape(t, units, 4, 16, 4).transpose(3, 4).reshape(t, units * L.UNIT_K)


def tune_key(dtype, k, n, bits, group_size, n_slots, t, active=None) -> tuple:
    """Autotuning key: shape, layout, slot count, batch-size class and (if given) the class of the
    number of live slots (a host-side hint: no device read)."""
    return ("sbmm24", dtype, k, n, bits, group_size, n_slots, batch_class(t), batch_class(active or n_slots))


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
) -> torch.Tensor:
    """Semantics: out[t, :] += x[t, :] @ dequant(Δ[slot[t]])ᵀ for every t with 0 <= slot[t] < S.

    Shape: x [T, k] fp16/bf16 (unit stride along k); dw [S, N, W] int16 (``layout.to_device_layout``
    of 2:4 2/4-bit parts); scales [S, N, G] fp32; slot [T] int32; out [T, N] in x's dtype (zeros if
    None). ``active``: how many slots are live (autotuning hint only).
    """
    lay = L.QuantLayout(bits=bits, sparsity="2:4", group_size=group_size)
    if not L.supported(lay):
        raise CodecError(f"the slot-layout kernel does not read {lay}")
    if x.dim() != 2 or x.shape[1] != k or x.dtype not in (torch.float16, torch.bfloat16):
        raise ShapeMismatchError(f"x must be fp16/bf16 [T, {k}], got {x.dtype} {tuple(x.shape)}")
    if dw.dim() != 3 or dw.dtype != torch.int16 or dw.shape[2] != L.device_shape(lay, 1, k)[1]:
        raise ShapeMismatchError(
            f"dw must be int16 [S, N, {L.device_shape(lay, 1, k)[1]}], got {dw.dtype} {tuple(dw.shape)}"
        )
    n_slots, n = dw.shape[:2]
    if tuple(scales.shape) != (n_slots, n, lay.n_groups(k)) or scales.dtype != torch.float32:
        raise ShapeMismatchError(
            f"scales must be float32 {(n_slots, n, lay.n_groups(k))}, got {tuple(scales.shape)}"
        )
    if slot.shape != (x.shape[0],):
        raise ShapeMismatchError(f"slot must be [{x.shape[0]}], got {tuple(slot.shape)}")
    t = x.shape[0]
    if out is None:
        out = torch.zeros(t, n, dtype=x.dtype, device=x.device)
    elif tuple(out.shape) != (t, n) or out.dtype != x.dtype:
        raise ShapeMismatchError(f"out must be {x.dtype} [{t}, {n}], got {out.dtype} {tuple(out.shape)}")
    check_device(x, dw, scales, slot, out)
    if t == 0 or n_slots == 0:
        return out
    if x.stride(1) != 1 or dw.stride(2) != 1:
        x = x.contiguous()
        dw = dw.contiguous()
    p = plan(slot, n_slots) if plan_ is None else plan_
    check_plan(p, t, n_slots)
    ieee = interpreting() and x.dtype == torch.bfloat16  # the interpreter's bf16 dot is wrong

    def launch(c: Config, o: torch.Tensor) -> None:
        xk = permute_x(x, k) if c.xperm else x
        # work items <= (non-empty slots) + cdiv(T, BM), and non-empty slots <= min(S, T)
        grid = (triton.cdiv(n, c.block_n) * c.split, min(n_slots, t) + triton.cdiv(t, c.block_m))
        _sbmm24_kernel[grid](
            xk,
            dw,
            scales,
            o,
            p.order,
            p.seg,
            n,
            k,
            n_slots,
            L.n_units(k),
            scales.shape[2],
            xk.stride(0),
            dw.stride(0),
            dw.stride(1),
            scales.stride(0),
            scales.stride(1),
            o.stride(0),
            o.stride(1),
            BITS=bits,
            GROUP=group_size or 0,
            S_P2=max(64, next_pow2(n_slots)),
            BLOCK_M=c.block_m,
            BLOCK_N=c.block_n,
            ASM=not interpreting(),
            F16=x.dtype == torch.float16,
            IEEE=ieee,
            EVEN=k % L.UNIT_K == 0,
            SPLIT=c.split,
            XPERM=c.xperm,
            num_warps=c.num_warps,
            num_stages=c.num_stages,
            **({"maxnreg": c.maxnreg} if c.maxnreg else {}),
        )

    if config is None:
        key = tune_key(x.dtype, k, n, bits, group_size, n_slots, t, active)
        if interpreting():
            cands = [INTERPRET_CONFIG]
        elif t > 256:
            cands = PREFILL_CONFIGS
        else:  # split-K only pays when few (slot, token block) items leave SMs idle
            cands = DECODE_CONFIGS + (SPLIT_CONFIGS if (active or n_slots) <= 8 else [])
        config = TUNER.pick(key, cands, lambda c: launch(c, torch.empty_like(out)))
    launch(config, out)
    return out

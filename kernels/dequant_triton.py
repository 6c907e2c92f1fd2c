"""Triton helpers shared by the delta kernels: unpacking the qlinear layout of deltahub.format
into float tiles, and mapping a program to its (slot, token block) work item."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fields(row_ptrs, row_mask, v0, n_words, BKV: tl.constexpr, FW: tl.constexpr):
    """Unsigned FW-bit fields v0 .. v0+BKV of each row -> [BN, BKV] int32 (0 past the row)."""
    PER: tl.constexpr = 32 // FW
    if BKV >= PER:
        BW: tl.constexpr = BKV // PER
        wo = v0 // PER + tl.arange(0, BW)
        words = tl.load(
            row_ptrs[:, None] + wo[None, :], mask=row_mask[:, None] & (wo < n_words)[None, :], other=0
        )
        shifts = tl.arange(0, PER) * FW
        f = (words[:, :, None] >> shifts[None, None, :]) & ((1 << FW) - 1)
        return tl.reshape(f, (words.shape[0], BKV))
    else:  # tile narrower than a word (small groups): one load per value
        jv = v0 + tl.arange(0, BKV)
        wo = jv // PER
        words = tl.load(
            row_ptrs[:, None] + wo[None, :], mask=row_mask[:, None] & (wo < n_words)[None, :], other=0
        )
        return (words >> ((jv % PER) * FW)[None, :]) & ((1 << FW) - 1)


@triton.jit
def _values(
    qw_rows,
    qh_rows,
    sc_rows,
    row_mask,
    v0,
    n_qw,
    n_qh,
    n_groups,
    BITS: tl.constexpr,
    SPARSE: tl.constexpr,
    GROUP: tl.constexpr,
    ZP: tl.constexpr,
    BKV: tl.constexpr,
    SCALE_IN: tl.constexpr,
    BIASED: tl.constexpr,
):
    """Stored values v0 .. v0+BKV of each row -> [BN, BKV] float32: ``code - zero_point`` (+1/2 if
    BIASED: one float add instead of two), times the value's scale if SCALE_IN."""
    if BITS == 3:
        code = _fields(qw_rows, row_mask, v0, n_qw, BKV, 2) | (
            _fields(qh_rows, row_mask, v0, n_qh, BKV, 1) << 2
        )
    else:
        code = _fields(qw_rows, row_mask, v0, n_qw, BKV, BITS)
    f = (code | 0x4B000000).to(tl.float32, bitcast=True)  # 2**23 + code, exactly
    if BIASED:
        v = f - (8388608.0 + ZP - 0.5)
    else:
        v = (f - 8388608.0) - ZP
    if SCALE_IN:
        jv = v0 + tl.arange(0, BKV)
        if GROUP == 0:
            g = jv * 0
        elif SPARSE:
            g = (jv // 2 * 4) // GROUP
        else:
            g = jv // GROUP
        sc = tl.load(
            sc_rows[:, None] + g[None, :], mask=row_mask[:, None] & (g < n_groups)[None, :], other=0.0
        )
        v = v * sc
    return v


@triton.jit
def _dequant_tile(
    qw_rows,
    qh_rows,
    meta_rows,
    sc_rows,
    row_mask,
    k0,
    n_qw,
    n_qh,
    n_meta,
    n_groups,
    BITS: tl.constexpr,
    SPARSE: tl.constexpr,
    GROUP: tl.constexpr,
    ZP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_IN: tl.constexpr,
    BIASED: tl.constexpr,
):
    """Dense tile [BN, BLOCK_K] (inputs k0 .. k0+BLOCK_K) of the rows given by their pointers.

    Values are ``code - zero_point``, times the scale if SCALE_IN, 0 where 2:4 pruned; if BIASED
    (not with SCALE_IN), +1/2 everywhere, pruned entries too: ``code - zero_point + 1/2`` is an
    integer made in one float add, and the caller subtracts ``sum(x) / 2``, which no row depends on.
    """
    RATIO: tl.constexpr = 2 if SPARSE else 1
    BKV: tl.constexpr = BLOCK_K // RATIO
    v0 = k0 // RATIO
    v = _values(
        qw_rows,
        qh_rows,
        sc_rows,
        row_mask,
        v0,
        n_qw,
        n_qh,
        n_groups,
        BITS,
        SPARSE,
        GROUP,
        ZP,
        BKV,
        SCALE_IN,
        BIASED,
    )
    PRUNED: tl.constexpr = 0.5 if BIASED else 0.0
    if SPARSE:
        p = _fields(meta_rows, row_mask, v0, n_meta, BKV, 2)
        va, vb = tl.split(tl.reshape(v, (v.shape[0], BLOCK_K // 4, 2)))
        pa, pb = tl.split(tl.reshape(p, (p.shape[0], BLOCK_K // 4, 2)))
        # positions are increasing: pa in {0,1,2}, pb in {1,2,3}
        w0 = tl.where(pa == 0, va, PRUNED)
        w1 = tl.where(pa == 1, va, tl.where(pb == 1, vb, PRUNED))
        w2 = tl.where(pa == 2, va, tl.where(pb == 2, vb, PRUNED))
        w3 = tl.where(pb == 3, vb, PRUNED)
        w = tl.join(tl.join(w0, w2), tl.join(w1, w3))
        w = tl.reshape(w, (v.shape[0], BLOCK_K))
    else:
        w = v
    return w


@triton.jit
def _segment(seg_ptr, S, S_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's work item (axis 1): slot, first and end position of its tokens in the plan's
    order, and the number of work items in use (programs at or past it have none and must exit)."""
    return _segment_at(seg_ptr, S, S_P2, BLOCK_M, tl.program_id(1))


@triton.jit
def _segment_at(seg_ptr, S, S_P2: tl.constexpr, BLOCK_M: tl.constexpr, w):
    """Work item ``w``: slot, first and end position of its tokens in the plan's order, and the
    number of work items in use (for w at or past it the slot is S: no item)."""
    offs_s = tl.arange(0, S_P2)
    smask = offs_s < S
    lo = tl.load(seg_ptr + offs_s, mask=smask, other=0)
    hi = tl.load(seg_ptr + offs_s + 1, mask=smask, other=0)
    nb = (hi - lo + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(nb, axis=0)
    s = tl.sum((cum <= w).to(tl.int32), axis=0)
    sel = offs_s == s
    seg_hi = tl.sum(tl.where(sel, hi, 0), axis=0)
    start = tl.sum(tl.where(sel, lo + (w - cum + nb) * BLOCK_M, 0), axis=0)
    return s, start, seg_hi, tl.sum(nb, axis=0)


@triton.jit
def _work_item(seg_ptr, order_ptr, S, S_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """This program's work item (axis 1): slot, token ids [BLOCK_M], their mask, and the number of
    work items in use (programs at or past it have none and must exit)."""
    s, start, seg_hi, n_work = _segment(seg_ptr, S, S_P2, BLOCK_M)
    offs_m = start + tl.arange(0, BLOCK_M)
    m_mask = offs_m < seg_hi
    tok = tl.load(order_ptr + offs_m, mask=m_mask, other=0)
    return s, tok, m_mask, n_work


@triton.jit
def _unit_value(
    q0,
    q1,
    h0,
    sc_rows,
    g,
    sc_mask,
    t: tl.constexpr,
    BITS: tl.constexpr,
    ZP: tl.constexpr,
    SCALE_IN: tl.constexpr,
    BIASED: tl.constexpr,
):
    """Value t of every unit column as a [BN, BWU] float tensor (see _values), from the unit's code
    words q0, q1 (values 0.. and PER..) and high-bit word h0 (3-bit). Offsets are compile-time per
    t, so the chain from the loads is elementwise with scalar constants only: the compiler then
    keeps the tile in registers in the dot-operand layout (a shift that varies along the columns
    would make it convert the tile through shared memory instead)."""
    FW: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // FW
    words = q0 if t // PER == 0 else q1
    code = (words >> (FW * (t % PER))) & ((1 << FW) - 1)  # logical shift, then one LOP3 with the OR
    if BITS == 3:
        code = code | (((h0 >> (t % 32)) & 1) << 2)
    f = (code | 0x4B000000).to(tl.float32, bitcast=True)
    if BIASED:
        v = f - (8388608.0 + ZP - 0.5)
    else:
        v = (f - 8388608.0) - ZP
    if SCALE_IN:
        v = v * tl.load(sc_rows[:, None] + g, mask=sc_mask, other=0.0)
    return v


@triton.jit
def _load_cols(row_ptrs, cols, row_mask, n_cols, EVEN: tl.constexpr):
    """[BN, C] int32 words at columns ``cols`` of each row (0 outside; no masks when EVEN)."""
    if EVEN:
        return tl.load(row_ptrs[:, None] + cols[None, :])
    else:
        return tl.load(
            row_ptrs[:, None] + cols[None, :], mask=row_mask[:, None] & (cols < n_cols)[None, :], other=0
        )


@triton.jit
def _x_cols(xb, off, s_xk, kb, K, EVEN: tl.constexpr):
    """x^T rows kb + off for the tile's tokens -> [C, BM], from base pointers xb [C, BM] at rows kb.
    Tokens past the segment read token 0 (their columns are never stored), so only K needs a mask,
    and none when EVEN; with a unit K stride the offset folds into the load's address."""
    if EVEN:
        return tl.load(xb + off * s_xk)
    else:
        return tl.load(xb + off * s_xk, mask=((kb + off) < K)[:, None], other=0.0)


@triton.jit
def _split_step(
    acc,
    xacc,
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
    BITS: tl.constexpr,
    SPARSE: tl.constexpr,
    GROUP: tl.constexpr,
    ZP: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALE_IN: tl.constexpr,
    BIASED: tl.constexpr,
    IEEE: tl.constexpr,
    EVEN: tl.constexpr,
):
    """One K step of mode 3: returns (acc + W_tile @ x_tile, xacc + the x it read [BWU, BM]).

    The step's stored values are cut into unit columns of UV values (UV = values per code word,
    per meta word (16) and per high-bit word (32), whichever is largest). Value t of every unit is
    one [BN, BWU] tensor; for 2:4, pair (2i, 2i+1) is placed on dense position q by selects, and
    each such column set is multiplied by the x rows it meets (stride UV dense, or 2*UV for 2:4).
    EVEN: K % BLOCK_K == 0 and N % BLOCK_N == 0, so no load needs a mask.
    """
    FW: tl.constexpr = 2 if BITS == 3 else BITS
    PER: tl.constexpr = 32 // FW
    UV0: tl.constexpr = 32 if BITS == 3 else PER
    UV: tl.constexpr = UV0 if (UV0 >= 16 or not SPARSE) else 16
    RATIO: tl.constexpr = 2 if SPARSE else 1
    BWU: tl.constexpr = BLOCK_K // RATIO // UV
    u = tl.arange(0, BWU)
    cq = (k0 // RATIO) // UV + u  # unit column index, [BWU]
    ch = cq
    kb = k0 + RATIO * UV * u  # dense index where each unit column starts
    xb = x_ptr + tok[None, :] * s_xt + kb[:, None] * s_xk
    # the unit's words, each loaded once: codes (1 or 2), high bits (3-bit), 2:4 positions (1 or 2)
    q0 = _load_cols(qw_rows, cq * (UV // PER), n_mask, n_qw, EVEN).to(tl.uint32, bitcast=True)
    q1 = q0
    if UV // PER > 1:
        q1 = _load_cols(qw_rows, cq * (UV // PER) + 1, n_mask, n_qw, EVEN).to(tl.uint32, bitcast=True)
    h0 = q0
    if BITS == 3:
        h0 = _load_cols(qh_rows, ch * (UV // 32), n_mask, n_qh, EVEN).to(tl.uint32, bitcast=True)
    if SPARSE:
        m0 = _load_cols(meta_rows, cq * (UV // 16), n_mask, n_meta, EVEN).to(tl.uint32, bitcast=True)
        m1 = m0
        if UV > 16:
            m1 = _load_cols(meta_rows, cq * (UV // 16) + 1, n_mask, n_meta, EVEN).to(tl.uint32, bitcast=True)
        PRUNED: tl.constexpr = 0.5 if BIASED else 0.0
        for i in tl.static_range(UV // 2):
            kg = k0 + 2 * UV * u + 4 * i  # dense index of pair i's group of 4, [BWU]
            g = (kg // GROUP)[None, :] if GROUP > 0 else u[None, :] * 0
            sc_mask = n_mask[:, None] & (g < n_groups)
            va = _unit_value(q0, q1, h0, sc_rows, g, sc_mask, 2 * i, BITS, ZP, SCALE_IN, BIASED)
            vb = _unit_value(q0, q1, h0, sc_rows, g, sc_mask, 2 * i + 1, BITS, ZP, SCALE_IN, BIASED)
            mw = m0 if i < 8 else m1
            for q in tl.static_range(4):
                # "position == q" as ((meta ^ (q << s)) & (3 << s)) == 0, s the field's bit offset
                # (4i mod 32 for the pair's first position, +2 for its second): one LOP3 + predicate
                if q == 0:
                    wt = tl.where((mw & (3 << (4 * i % 32))) == 0, va, PRUNED)
                elif q == 3:
                    wt = tl.where(((mw ^ (3 << (4 * i % 32 + 2))) & (3 << (4 * i % 32 + 2))) == 0, vb, PRUNED)
                else:
                    a_here = ((mw ^ (q << (4 * i % 32))) & (3 << (4 * i % 32))) == 0
                    b_here = ((mw ^ (q << (4 * i % 32 + 2))) & (3 << (4 * i % 32 + 2))) == 0
                    wt = tl.where(a_here, va, tl.where(b_here, vb, PRUNED))
                xq = _x_cols(xb, 4 * i + q, s_xk, kb, K, EVEN)
                if IEEE:
                    acc = tl.dot(wt, xq.to(tl.float32), acc, input_precision="ieee")
                else:
                    acc = tl.dot(wt.to(xq.dtype), xq, acc)
                if BIASED:
                    xacc += xq.to(tl.float32)
    else:
        for t in tl.static_range(UV):
            kq = k0 + UV * u + t
            g = (kq // GROUP)[None, :] if GROUP > 0 else u[None, :] * 0
            sc_mask = n_mask[:, None] & (g < n_groups)
            wt = _unit_value(q0, q1, h0, sc_rows, g, sc_mask, t, BITS, ZP, SCALE_IN, BIASED)
            xq = _x_cols(xb, t, s_xk, kb, K, EVEN)
            if IEEE:
                acc = tl.dot(wt, xq.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(wt.to(xq.dtype), xq, acc)
            if BIASED:
                xacc += xq.to(tl.float32)
    return acc, xacc

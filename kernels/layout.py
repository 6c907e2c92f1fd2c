"""GPU slot layout of 2:4 qlinear deltas (2- and 4-bit): one repack when a delta enters a slot.

``deltahub.format`` stays the storage and transfer layout; this is what the SBMM kernel reads. The
kept pairs are regrouped so that the kernel decodes with compile-time shifts only, every step
elementwise (see ``kernels/sbmm.py``). Same bytes as the packed parts (qweight + meta).

Per output row, groups of 4 dense inputs are cut into units of 64 groups (256 inputs; K is padded
with empty groups to a multiple of 256). Group ``g = 64u + 16s + w`` of unit u sits in sub-phase
s (0..3) at column w (0..15). A unit is WPU int16 words, three (4-bit) or two (2-bit) columns of 16:

    4-bit: [A_0..A_15, B_0..B_15, P_0..P_15]   A_w: nibbles c0(s=0), c1(s=0), c0(s=1), c1(s=1)
                                                B_w: the same for s = 2, 3
    2-bit: [C_0..C_15, P_0..P_15]              C_w: bits 4s..4s+3 = c0(s) | c1(s) << 2
    P_w: keep mask of group (s, w): bit ``mask_bit(s, j)`` set if dense position j holds a kept
         value; mask_bit(s, j) = (7 if j is even else 15) - (2s + j // 2), so that a shift left by
         2s or 2s + 1 brings every bit of sub-phase s to the top of a byte (where PRMT reads it)

c0 / c1 are the codes of the group's first / second kept value (positions increasing), so the
value at position j is c0 if j is the lower kept position, c1 if the higher. Empty (padding)
groups have mask 0. Scales are not repacked (``[N, G]`` as stored).
"""

from __future__ import annotations

import torch

from deltahub.errors import CodecError
from deltahub.format import QuantLayout, pack_bits, unpack_bits, unpack_codes

UNIT_GROUPS = 64  # groups of 4 inputs per unit
UNIT_K = 4 * UNIT_GROUPS  # dense inputs per unit


def mask_bit(s: int, j: int) -> int:
    """Bit of P_w holding "dense position j of the group in sub-phase s is kept"."""
    return (7 if j % 2 == 0 else 15) - (2 * s + j // 2)


MASK_BITS = [[mask_bit(s, j) for j in range(4)] for s in range(4)]


def supported(layout: QuantLayout) -> bool:
    """Layouts the device kernel reads: 2:4 with 2- or 4-bit codes, scales per row or per >= 64
    inputs (one scale per sub-phase of a unit)."""
    return layout.sparse and layout.bits in (2, 4) and (layout.group_size or 64) >= 64


def words_per_unit(bits: int) -> int:
    return 48 if bits == 4 else 32


def n_units(k: int) -> int:
    return -(-k // UNIT_K)


def device_shape(layout: QuantLayout, n: int, k: int) -> tuple[int, int]:
    """Shape of the repacked int16 array of an [n, k] delta."""
    return (n, n_units(k) * words_per_unit(layout.bits))


def _check(layout: QuantLayout) -> None:
    if not supported(layout):
        raise CodecError(f"no GPU slot layout for {layout} (2:4, bits 2 or 4, group size None or >= 64)")


def to_device_layout(
    parts: dict[str, torch.Tensor], layout: QuantLayout, n: int, k: int
) -> dict[str, torch.Tensor]:
    """Packed qlinear parts of format.py -> {"dw": int16 [..., n, units * WPU], "scales"}.

    Leading dims (e.g. a stack of slots) are kept. Runs as a few torch ops on the parts' device.
    """
    _check(layout)
    qw, meta = parts["qweight"], parts["meta"]
    lead = qw.shape[:-2]
    rows = qw.reshape(-1, *qw.shape[-2:])
    mrow = meta.reshape(-1, *meta.shape[-2:])
    b = rows.shape[0]
    codes = unpack_codes({"qweight": rows}, layout.bits).to(torch.int32)  # [b, n, Kv]
    pos = unpack_bits(mrow, 2).to(torch.int32)  # [b, n, Kv]
    ng = codes.shape[-1] // 2
    units = n_units(k)
    pad = units * UNIT_GROUPS - ng
    c0, c1 = codes[..., 0::2], codes[..., 1::2]
    one = torch.ones((), dtype=torch.int32, device=qw.device)
    keep = (one << pos[..., 0::2]) | (one << pos[..., 1::2])
    c0, c1, keep = (torch.nn.functional.pad(t, (0, pad)).reshape(b, n, units, 4, 16) for t in (c0, c1, keep))
    sh = 4 * torch.arange(4, dtype=torch.int32, device=qw.device).view(4, 1)
    bit = torch.tensor(MASK_BITS, dtype=torch.int32, device=qw.device).view(4, 1, 4)  # [s, 1, j]
    p = (((keep.unsqueeze(-1) >> torch.arange(4, device=qw.device)) & 1) << bit).sum((-3, -1))
    if layout.bits == 4:
        pair = c0 | (c1 << 4)  # one byte per group
        a = pair[..., 0, :] | (pair[..., 1, :] << 8)
        bb = pair[..., 2, :] | (pair[..., 3, :] << 8)
        cols = [a, bb, p]
    else:
        cols = [((c0 | (c1 << 2)) << sh).sum(-2), p]
    dw = torch.stack(cols, dim=-2).reshape(b, n, -1)  # unit-major: [units, cols, 16]
    dw = torch.where(dw >= 2**15, dw - 2**16, dw).to(torch.int16)
    return {"dw": dw.reshape(*lead, n, -1), "scales": parts["scales"]}


def from_device_layout(
    dev: dict[str, torch.Tensor], layout: QuantLayout, n: int, k: int
) -> dict[str, torch.Tensor]:
    """Inverse of to_device_layout: -> {"qweight", "meta", "scales"} as format.py packs them."""
    _check(layout)
    dw = dev["dw"]
    lead = dw.shape[:-2]
    w = dw.reshape(-1, n, n_units(k), words_per_unit(layout.bits) // 16, 16).to(torch.int32) & 0xFFFF
    sh = 4 * torch.arange(4, dtype=torch.int32, device=dw.device).view(4, 1)
    p = w[..., -1, :]
    bit = torch.tensor(MASK_BITS, dtype=torch.int32, device=dw.device).view(4, 1, 4)  # [s, 1, j]
    keep = (((p[..., None, :, None] >> bit) & 1) << torch.arange(4, device=dw.device)).sum(-1)
    if layout.bits == 4:
        pair = torch.stack([w[..., 0, :], w[..., 0, :] >> 8, w[..., 1, :], w[..., 1, :] >> 8], dim=-2) & 0xFF
        c0, c1 = pair & 0xF, pair >> 4
    else:
        f = (w[..., 0, :].unsqueeze(-2) >> sh) & 0xF
        c0, c1 = f & 3, f >> 2
    kv = layout.n_values(k)
    b = w.shape[0]
    ng = kv // 2
    c0, c1, keep = (t.reshape(b, n, -1)[..., :ng] for t in (c0, c1, keep))
    if bool((keep.unsqueeze(-1) >> torch.arange(4, device=dw.device) & 1).sum(-1).ne(2).any()):
        raise CodecError("device layout: a group does not keep exactly 2 of 4 inputs")
    lo = (keep & -keep).float().log2().to(torch.int32)  # lowest set bit
    hi = (keep & ~(keep & -keep)).float().log2().to(torch.int32)
    codes = torch.stack([c0, c1], dim=-1).reshape(b, n, kv)
    pos = torch.stack([lo, hi], dim=-1).reshape(b, n, kv)
    qw = pack_bits(codes, layout.bits)
    meta = pack_bits(pos, 2)
    return {
        "qweight": qw.reshape(*lead, n, -1),
        "meta": meta.reshape(*lead, n, -1),
        "scales": dev["scales"],
    }

"""GPU slot layout of 2:4 qlinear deltas (2- and 4-bit): one repack when a delta enters a slot.

``deltahub.format`` stays the storage and transfer layout; this is what the SBMM kernel
(``kernels/sbmm24.py``) reads: the operands of the sparse tensor-core instruction
``mma.sp ... m16n8k32`` in the order each thread of a warp holds them, so a thread loads its
registers with 16-byte loads and decodes them with a few shifts, no placement of the 2:4 pairs (the
hardware reads the positions). Same information as the packed parts (codes + 2-bit positions), the
same bytes when N is a multiple of 64 and K of 64 (otherwise padded to those).

Output rows are cut into blocks of 64 (4 tiles of 16 rows), inputs into steps of 64 (2 sub-steps of
32 inputs = 8 groups of 4). Per (block b, step u), 128 int32 words per part, ``[lane 0..31][r 0..3]``:

    4-bit: parts [codes kk=0, codes kk=1, meta]     2-bit: parts [codes, meta]

With lane = 4 g + p, tile r, row0 = 64 b + 16 r + g, row1 = row0 + 8, group j of sub-step kk =
group 16 u + 8 kk + j of the row, the thread's fragment registers are a_0 = (row0, group p),
a_1 = (row1, p), a_2 = (row0, p + 4), a_3 = (row1, p + 4), each holding the two kept codes
(c0 at the lower position). Codes word of tile r: 4-bit: c0(a_i) at bits 4i..4i+3 and c1(a_i) at
16 + 4i (one word per sub-step); 2-bit: field f = 4 kk + i, c0 at bits 2f, c1 at 16 + 2f (one word
for both sub-steps). Meta word q = 2 kk + pair (pair = r // 2) of lane 4 g + p serves tile
r = 2 pair + p // 2 (sparsity selector p // 2): bits 16 h + 4 jj hold (idx0 | idx1 << 2) of row
row0 + 8 h, group 4 (p % 2) + jj of sub-step kk (the order mma.sp reads its metadata in).
Padding rows / groups: codes 0, positions (0, 1). Scales are not repacked (``[N, G]`` as stored).
"""

from __future__ import annotations

import torch

from deltahub.errors import CodecError
from deltahub.format import QuantLayout, pack_bits, unpack_bits, unpack_codes

BLOCK_ROWS = 64  # output rows per block (4 tensor-core tiles of 16)
STEP_K = 64  # dense inputs per step (2 sub-steps of 32)
WORDS = 128  # int32 words per part of a (block, step): 32 lanes x 4


def supported(layout: QuantLayout) -> bool:
    """Layouts the device kernel reads: 2:4 with 2- or 4-bit codes, scales per row or per a
    multiple of 64 inputs (one scale per step)."""
    return layout.sparse and layout.bits in (2, 4) and (layout.group_size or 64) % STEP_K == 0


def parts(bits: int) -> int:
    """int32 parts per (block, step): codes (two sub-steps for 4-bit, one word for 2-bit) + meta."""
    return 3 if bits == 4 else 2


def n_steps(k: int) -> int:
    return -(-k // STEP_K)


def n_blocks(n: int) -> int:
    return -(-n // BLOCK_ROWS)


def permute_x_torch(x: torch.Tensor, k: int) -> torch.Tensor:
    """The inputs' side of the layout: x [T, k] fp16/bf16 -> int32 [T, steps * 32], zero-padded to
    whole steps, each 32 inputs reordered so that a thread's B fragment of mma.sp is 16 contiguous
    bytes (pair (2 p + 8 i, +1) of a sub-step moves to int32 word 4 p + i). In torch ops: the
    reference of ``sbmm24.permute_x`` and of the kernels that write this copy as they make x
    (``norm_act``)."""
    steps = n_steps(k)
    if steps * STEP_K != k:
        x = torch.nn.functional.pad(x, (0, steps * STEP_K - k))
    t = x.shape[0]
    xp = x.reshape(t, steps * 2, 4, 4, 2).transpose(2, 3).contiguous()
    return xp.view(torch.int32).reshape(t, steps * 32)


def device_shape(layout: QuantLayout, n: int, k: int) -> tuple[int, int]:
    """Shape of the repacked int16 array of an [n, k] delta: (n, W), the int32 words of all blocks
    spread over n rows (W = 12 per 64 inputs for 4-bit, 8 for 2-bit when n % 64 == 0)."""
    words = n_blocks(n) * n_steps(k) * parts(layout.bits) * WORDS  # int32
    w = -(-2 * words // n)
    return (n, w + (w % 2))


def _check(layout: QuantLayout) -> None:
    if not supported(layout):
        raise CodecError(f"no GPU slot layout for {layout} (2:4, bits 2 or 4, group size None or k * 64)")


def _wrap32(v: torch.Tensor) -> torch.Tensor:
    v = v & 0xFFFFFFFF
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def to_device_layout(
    parts_: dict[str, torch.Tensor], layout: QuantLayout, n: int, k: int
) -> dict[str, torch.Tensor]:
    """Packed qlinear parts of format.py -> {"dw": int16 [..., n, W], "scales"}.

    Leading dims (e.g. a stack of slots) are kept. Runs as a few torch ops on the parts' device.
    """
    _check(layout)
    qw, meta = parts_["qweight"], parts_["meta"]
    lead = qw.shape[:-2]
    dev = qw.device
    rows = qw.reshape(-1, *qw.shape[-2:])
    b = rows.shape[0]
    codes = unpack_codes({"qweight": rows}, layout.bits).to(torch.int64)  # [b, n, Kv]
    pos = unpack_bits(meta.reshape(-1, *meta.shape[-2:]), 2).to(torch.int64)
    c0, c1, p0, p1 = codes[..., 0::2], codes[..., 1::2], pos[..., 0::2], pos[..., 1::2]
    swap = p0 > p1  # c0 must sit at the lower position
    c0, c1 = torch.where(swap, c1, c0), torch.where(swap, c0, c1)
    nib = torch.minimum(p0, p1) | (torch.maximum(p0, p1) << 2)
    nb, ns = n_blocks(n), n_steps(k)
    pad_r, pad_g = nb * BLOCK_ROWS - n, ns * 16 - c0.shape[-1]
    c0, c1 = (torch.nn.functional.pad(t, (0, pad_g, 0, pad_r)) for t in (c0, c1))
    nib = torch.nn.functional.pad(nib, (0, pad_g, 0, pad_r), value=4)
    # [b, block, r, h_r, g, step, kk, h_j, p]: row 64 block + 16 r + 8 h_r + g, group 16 u + 8 kk + 4 h_j + p
    c0, c1, nib = (t.reshape(b, nb, 4, 2, 8, ns, 2, 2, 4) for t in (c0, c1, nib))
    i = torch.arange(2, device=dev)
    if layout.bits == 4:
        sh = (4 * (i.view(2, 1) + 2 * i.view(1, 2))).view(1, 1, 1, 2, 1, 1, 1, 2, 1)  # 4 (h_r + 2 h_j)
        w = ((c0 << sh) | (c1 << (sh + 16))).sum((3, 7))  # [b, block, r, g, step, kk, p]
        code_parts = [w[..., kk, :].permute(0, 1, 4, 3, 5, 2) for kk in range(2)]  # [b, blk, u, g, p, r]
    else:
        f = (i.view(2, 1, 1) + 4 * i.view(1, 2, 1) + 2 * i.view(1, 1, 2)).view(1, 1, 1, 2, 1, 1, 2, 2, 1)
        w = ((c0 << (2 * f)) | (c1 << (2 * f + 16))).sum((3, 6, 7))  # [b, block, r, g, step, p]
        code_parts = [w.permute(0, 1, 4, 3, 5, 2)]
    # meta: [b, blk, pair, sel, h_r, g, u, kk, h, jj] -> word bits 16 h_r + 4 jj, lane p = 2 sel + h
    m = nib.reshape(b, nb, 2, 2, 2, 8, ns, 2, 2, 4)
    msh = (16 * i.view(2, 1) + 4 * torch.arange(4, device=dev).view(1, 4)).view(1, 1, 1, 1, 2, 1, 1, 1, 1, 4)
    mw = (m << msh).sum((4, 9))  # [b, blk, pair, sel, g, u, kk, h]
    mw = mw.permute(0, 1, 5, 4, 3, 7, 6, 2).reshape(b, nb, ns, 8, 4, 4)  # [b, blk, u, g, p, q]
    words = torch.stack([*(c.reshape(b, nb, ns, 8, 4, 4) for c in code_parts), mw], dim=3)
    flat = _wrap32(words.reshape(b, -1))  # [b, blk, u, part, g, p, r|q]
    shape = device_shape(layout, n, k)
    flat = torch.nn.functional.pad(flat, (0, shape[0] * shape[1] // 2 - flat.shape[1]))
    dw = flat.contiguous().view(torch.int16).reshape(*lead, *shape)
    return {"dw": dw, "scales": parts_["scales"]}


def _fields(dw: torch.Tensor, layout: QuantLayout, n: int, k: int):
    """dw [..., n, W] -> (c0, c1, nib) int64 [b, rows, groups] of all blocks and steps (padded)."""
    nb, ns, npart = n_blocks(n), n_steps(k), parts(layout.bits)
    b = dw.reshape(-1, *dw.shape[-2:]).shape[0]
    words = dw.reshape(b, -1).contiguous().view(torch.int32)[:, : nb * ns * npart * WORDS]
    words = words.to(torch.int64).reshape(b, nb, ns, npart, 8, 4, 4) & 0xFFFFFFFF  # [.., g, p, r]
    dev = dw.device
    i = torch.arange(2, device=dev)
    if layout.bits == 4:
        sh = (4 * (i.view(2, 1) + 2 * i.view(1, 2))).view(2, 2, 1, 1, 1, 1, 1, 1)
        w = words[:, :, :, :2]  # [b, blk, u, kk, g, p, r]
        w = w.permute(0, 1, 6, 4, 2, 3, 5).unsqueeze(0).unsqueeze(0)  # [1, 1, b, blk, r, g, u, kk, p]
        c0 = (w >> sh.unsqueeze(-1)) & 15  # [h_r, h_j, b, blk, r, g, u, kk, p]
        c1 = (w >> (sh.unsqueeze(-1) + 16)) & 15
        perm = (2, 3, 4, 0, 5, 6, 7, 1, 8)  # -> [b, blk, r, h_r, g, u, kk, h_j, p]
    else:
        f = (4 * i.view(2, 1, 1) + i.view(1, 2, 1) + 2 * i.view(1, 1, 2)).view(2, 2, 2, 1, 1, 1, 1, 1, 1)
        w = words[:, :, :, 0].permute(0, 1, 5, 3, 2, 4)  # [b, blk, r, g, u, p]
        c0 = (w >> (2 * f)) & 3  # [kk, h_r, h_j, b, blk, r, g, u, p]
        c1 = (w >> (2 * f + 16)) & 3
        perm = (3, 4, 5, 1, 6, 7, 0, 2, 8)
    c0, c1 = (t.permute(*perm).reshape(b, nb * BLOCK_ROWS, ns * 16) for t in (c0, c1))
    mw = words[:, :, :, -1]  # [b, blk, u, g, p=(sel, h), q=(kk, pair)]
    mw = mw.reshape(b, nb, ns, 8, 2, 2, 2, 2).permute(0, 1, 7, 4, 3, 2, 6, 5)  # [b,blk,pair,sel,g,u,kk,h]
    msh = (16 * i.view(2, 1) + 4 * torch.arange(4, device=dev).view(1, 4)).view(2, 1, 1, 1, 1, 1, 1, 1, 1, 4)
    nib = (mw.unsqueeze(0).unsqueeze(-1) >> msh) & 15  # [h_r, b, blk, pair, sel, g, u, kk, h, jj]
    nib = nib.permute(1, 2, 3, 4, 0, 5, 6, 7, 8, 9).reshape(b, nb * BLOCK_ROWS, ns * 16)
    return c0, c1, nib


def from_device_layout(
    dev: dict[str, torch.Tensor], layout: QuantLayout, n: int, k: int
) -> dict[str, torch.Tensor]:
    """Inverse of to_device_layout: -> {"qweight", "meta", "scales"} as format.py packs them."""
    _check(layout)
    dw = dev["dw"]
    lead = dw.shape[:-2]
    c0, c1, nib = _fields(dw, layout, n, k)
    b = c0.shape[0]
    kv = layout.n_values(k)
    ng = kv // 2
    c0, c1, nib = (t[:, :n, :ng] for t in (c0, c1, nib))
    lo, hi = nib & 3, nib >> 2
    if bool((lo >= hi).any()):
        raise CodecError("device layout: a group does not keep two increasing positions")
    codes = torch.stack([c0, c1], dim=-1).reshape(b, n, kv)
    pos = torch.stack([lo, hi], dim=-1).reshape(b, n, kv)
    qw = pack_bits(codes.to(torch.int32), layout.bits)
    meta = pack_bits(pos.to(torch.int32), 2)
    return {
        "qweight": qw.reshape(*lead, n, -1),
        "meta": meta.reshape(*lead, n, -1),
        "scales": dev["scales"],
    }

"""GPU slot layout (kernels/layout.py) and the SBMM kernel that reads it, under the Triton
interpreter (the plain-Triton decode; the PTX decode runs in test_gpu.py) vs the float32 reference."""

from __future__ import annotations

import pytest
import torch
from deltahub.kernels import layout as L
from deltahub.kernels import plan, reference
from deltahub.kernels.sbmm24 import (
    ACC_SCALE,
    Config,
    _red_pairs_asm,
    decode_plan,
    max_items,
    permute_x,
    permute_x_torch,
    sbmm_device,
    tune_key,
)

from deltahub import kernels as K
from deltahub.errors import CodecError, ShapeMismatchError
from deltahub.format import QuantLayout

from .kernel_cases import SPREADS, assert_added, make_slots, make_stack, poisoned, used_slots

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize(("n", "k"), [(9, 64), (64, 300), (128, 512)])
def test_layout_round_trip_and_bytes(bits, n, k):
    lay = QuantLayout(bits, "2:4")
    st = make_stack(3, n, k, lay, torch.Generator().manual_seed(bits + k))
    dev = L.to_device_layout(st, lay, n, k)
    assert dev["dw"].dtype == torch.int16 and tuple(dev["dw"].shape) == (3, *L.device_shape(lay, n, k))
    back = L.from_device_layout(dev, lay, n, k)
    for name in ("qweight", "meta", "scales"):
        assert torch.equal(back[name], st[name]), name
    packed = sum(st[name][0].numel() * 4 for name in ("qweight", "meta"))
    if n % L.BLOCK_ROWS == 0 and k % L.STEP_K == 0:  # same bytes; else padded to whole blocks / steps
        assert dev["dw"][0].numel() * 2 == packed
    else:
        full = L.n_blocks(n) * L.BLOCK_ROWS * L.n_steps(k) * L.STEP_K * (bits + 2) // 8
        assert packed <= dev["dw"][0].numel() * 2 <= full + 4 * n


def _mma_sp_dense(dw, bits, n, k):
    """Dense [rows, inputs] weights 2 (c - z) of slot 0 as mma.sp m16n8k32 reads the layout: the A
    fragment and metadata placement of the PTX ISA, written out per lane independently of layout.py."""
    words = dw[0].reshape(-1).contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    nb, ns, npart = L.n_blocks(n), L.n_steps(k), L.parts(bits)
    words = words[: nb * ns * npart * 128].reshape(nb, ns, npart, 32, 4)
    dense = torch.zeros(nb * 64, ns * 64)
    z2 = 15 if bits == 4 else 3
    for b in range(nb):
        for u in range(ns):
            for kk in range(2):
                for r in range(4):
                    comp = torch.zeros(16, 16, dtype=torch.int64)  # compressed A: [row, 2 group + value]
                    idx = torch.zeros(16, 8, 2, dtype=torch.int64)  # metadata: [row, group, value]
                    for lane in range(32):
                        g, p = divmod(lane, 4)
                        w = int(words[b, u, kk if bits == 4 else 0, lane, r])
                        for i, (row, col) in enumerate(
                            [(g, 2 * p), (g + 8, 2 * p), (g, 2 * p + 8), (g + 8, 2 * p + 8)]
                        ):
                            o = 4 * i if bits == 4 else 2 * (4 * kk + i)
                            fm = 15 if bits == 4 else 3
                            comp[row, col], comp[row, col + 1] = (w >> o) & fm, (w >> (o + 16)) & fm
                        if p // 2 == r % 2:  # this lane holds metadata for tile r (sparsity selector r % 2)
                            m = int(words[b, u, -1, lane, 2 * kk + r // 2])
                            for half, row in ((0, g), (1, g + 8)):
                                for jj in range(4):
                                    nib = (m >> (16 * half + 4 * jj)) & 15
                                    idx[row, 4 * (p % 2) + jj] = torch.tensor([nib & 3, nib >> 2])
                    for row in range(16):
                        for grp in range(8):
                            for v in range(2):
                                col = 64 * u + 32 * kk + 4 * grp + int(idx[row, grp, v])
                                dense[64 * b + 16 * r + row, col] = 2 * int(comp[row, 2 * grp + v]) - z2
    return dense[:n, :k]


@pytest.mark.parametrize("bits", [2, 4])
def test_layout_is_the_mma_sp_fragment_order(bits):
    """The layout, read the way mma.sp reads its registers, gives the stored delta (x 2 / scale)."""
    n, k = 70, 100
    lay = QuantLayout(bits, "2:4")
    st = make_stack(1, n, k, lay, torch.Generator().manual_seed(5 + bits))
    dev = L.to_device_layout(st, lay, n, k)
    want = K.reference.dequant_slot(
        0,
        st["qweight"],
        torch.ones_like(st["scales"]),
        bits=bits,
        sparse=True,
        group_size=None,
        k=k,
        meta=st["meta"],
    )
    torch.testing.assert_close(_mma_sp_dense(dev["dw"], bits, n, k), 2 * want.float(), rtol=0, atol=0)


def test_layout_rejects_unsupported():
    with pytest.raises(CodecError):
        L.to_device_layout({}, QuantLayout(3, "2:4"), 4, 64)
    with pytest.raises(CodecError):
        L.to_device_layout({}, QuantLayout(4, "none"), 4, 64)
    assert not L.supported(QuantLayout(4, "2:4", 32)) and L.supported(QuantLayout(2, "2:4", 128))


def _run(
    bits,
    spread,
    dtype,
    *,
    t=13,
    s=4,
    n=70,
    k=300,
    group_size=None,
    seed=0,
    config=None,
    own_plan=False,
    active=None,
):
    gen = torch.Generator().manual_seed(seed)
    lay = QuantLayout(bits, "2:4", group_size)
    st = make_stack(s, n, k, lay, gen)
    dev = L.to_device_layout(st, lay, n, k)
    x = torch.randn(t, k, generator=gen).to(dtype)
    slot = make_slots(spread, t, s, gen)
    kw = dict(bits=bits, sparse=True, group_size=group_size, k=k, meta=st["meta"])
    y = reference.sbmm(x.float(), st["qweight"], st["scales"], slot, **kw)
    init, out = poisoned(t, n, slot, dtype, gen)
    sbmm_device(
        x,
        dev["dw"],
        dev["scales"],
        slot,
        bits=bits,
        group_size=group_size,
        k=k,
        out=out,
        config=config,
        plan_=plan(slot, s) if own_plan else None,
        active=used_slots(slot) if active == "exact" else active,
    )
    assert_added(init, out, y, slot, TOL[dtype])

@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("bits", [2, 4])
def test_sbmm_device_spreads(bits, spread):
    dtype = torch.bfloat16 if (bits // 2 + SPREADS.index(spread)) % 2 else torch.float16
    _run(bits, spread, dtype, seed=bits * 7 + SPREADS.index(spread))


@pytest.mark.parametrize("spread", SPREADS)
def test_sbmm_device_grid_sized_by_active_slots(spread):
    """Given how many slots the tokens use (as the engine knows it), the grid has rows for the
    work items that many slots can make and no more (``max_items``): every token still gets its
    delta, whatever the spread, a slot's tokens spanning several blocks included."""
    _run(4, spread, torch.bfloat16, t=41, s=9, seed=3 + SPREADS.index(spread), active="exact")
    # the bound is tight: one slot with all but a - 1 tokens, a - 1 slots with one each
    for a, t, bm in [(1, 1, 8), (16, 32, 8), (16, 64, 16), (3, 5, 8), (64, 64, 8)]:
        worst = -(-(t - a + 1) // bm) + a - 1
        assert max_items(64, t, bm, a) == worst, (a, t, bm)
    with pytest.raises(ShapeMismatchError, match="active"):
        _run(4, "zipf", torch.bfloat16, active=5)  # 4 slots


@pytest.mark.parametrize(("bits", "group_size", "k"), [(4, 64, 300), (2, 128, 512), (4, 256, 700)])
def test_sbmm_device_group_scales(bits, group_size, k):
    _run(bits, "uniform", torch.float16, group_size=group_size, k=k, n=33)


def test_sbmm_device_even_shapes_several_blocks_and_plan():
    """K a multiple of the unit (loads without masks), several output blocks, a given plan."""
    _run(4, "zipf", torch.bfloat16, t=37, s=5, n=96, k=512, config=Config(16, 4), own_plan=True)
    _run(2, "hot_base", torch.float16, t=5, s=12, n=40, k=256, config=Config(8, 2))


@pytest.mark.parametrize("programs", [1, 3, 7, 500])
def test_sbmm_device_stream_k_grid(programs):
    """Stream-K: each program runs an equal share of all (work item, row block, step) units, so
    tasks are cut anywhere (pieces add atomically); more programs than units leave some idle."""
    cfg = Config(8, 4, stream=programs)
    _run(4, "zipf", torch.bfloat16, t=37, s=5, n=96, k=512, config=cfg, seed=programs)
    _run(2, "hot_base", torch.float16, t=9, s=6, n=70, k=300, group_size=128, config=cfg, seed=programs)


@pytest.mark.parametrize("f16", [False, True])
@pytest.mark.parametrize("bits", [2, 4])
def test_decode_plan_gives_code_minus_zero_exactly(bits, f16):
    """The PTX decode's arithmetic, emulated: shift, mask | magic, then t mult + add (one fma of the
    16-bit halves) must give (c - z) / ``ACC_SCALE`` exactly for every code of both halves (the asm
    is rendered from this plan; the GPU tests run it)."""
    dt = torch.float16 if f16 else torch.bfloat16
    w = torch.randint(0, 2**32, (4096,), generator=torch.Generator().manual_seed(bits), dtype=torch.int64)

    def halves(v: int | torch.Tensor) -> torch.Tensor:  # packed pair -> [.., 2] float64 (low, high)
        v = torch.as_tensor(v, dtype=torch.int64)
        pair = torch.stack([v & 0xFFFF, v >> 16], -1)
        return (pair - (pair >= 2**15) * 2**16).to(torch.int16).view(dt).double()

    for kk in (0, 1):
        plan_ = decode_plan(bits, f16, kk)
        n_shifts = len({op.shift for op in plan_} - {0})
        assert n_shifts == {(2, False): 2, (2, True): 1, (4, False): 4, (4, True): 2}[(bits, f16)]
        for i, op in enumerate(plan_):
            t = (w >> op.shift if op.shift >= 0 else w << -op.shift) & 0xFFFFFFFF
            got = halves((t & op.mask) | op.magic) * halves(op.mult) + halves(op.add)
            o = 4 * i if bits == 4 else 2 * (4 * kk + i)
            c = torch.stack([(w >> o) & (2**bits - 1), (w >> (o + 16)) & (2**bits - 1)], -1)
            want = (c.double() - (2**bits - 1) / 2) / ACC_SCALE
            assert torch.equal(got, want), (kk, i, op)
            assert torch.equal(got.to(dt).double(), got)  # the one rounding of the fma is exact


def _run_warp_asm(asm: str, operands: list[list]) -> dict[int, float]:
    """Emulate the pair-reduction PTX on a warp of 32 lanes in lockstep: operands[lane][j] is $j
    (floats, byte addresses, ints), memory is {element address: value}; returns what the reds add."""
    regs = [{f"${j}": v for j, v in enumerate(ops)} for ops in operands]
    mem: dict[int, float] = {}
    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        pred, _, line = line.partition(" ") if line.startswith("@") else ("", "", line)
        op, _, rest = line.partition(" ")
        args = [a.strip() for a in rest.split(",")]
        if op.startswith("shfl.sync.bfly"):
            sent = [r[args[1]] for r in regs]
            for lane, r in enumerate(regs):
                r[args[0]] = sent[lane ^ int(args[2])]
            continue
        for lane, r in enumerate(regs):
            val = lambda a: lane if a == "%laneid" else r[a] if a in r else int(a, 0)  # noqa: B023, E731
            if pred and not r[pred[1:]]:
                continue
            if op == "mov.u32" or op == "mov.b32":
                r[args[0]] = val(args[1])
            elif op == "and.b32":
                r[args[0]] = val(args[1]) & val(args[2])
            elif op == "setp.ne.b32":
                r[args[0]] = val(args[1]) != val(args[2])
            elif op.startswith("selp"):
                r[args[0]] = val(args[1]) if r[args[3]] else val(args[2])
            elif op.startswith("cvt.rn.") and op.endswith("x2.f32"):
                r[args[0]] = (val(args[2]), val(args[1]))  # (low half, high half)
            elif op == "sub.s64":
                r[args[0]] = val(args[1]) - val(args[2])
            elif op.startswith("red.") and op.endswith("x2"):
                addr = val(args[0].strip("[]"))
                assert addr % 4 == 0, "a packed reduction must be 4-byte aligned"
                for half, v in enumerate(r[args[1]]):
                    mem[addr // 2 + half] = mem.get(addr // 2 + half, 0.0) + v
            else:
                raise AssertionError(f"emulator lacks {op}")
    return mem


@pytest.mark.parametrize("f16", [False, True])
def test_red_pairs_asm_adds_every_valid_value_once(f16):
    """The split-K reduction's PTX, emulated on a warp: lane (g = lane // 4, p = lane % 4) holds
    element i at row 16 + g + 8 (i // 2), token 2p + i % 2, as mma.sp leaves them; after the swap
    and the packed reds every value whose mask is set lands once at (token, row), nothing else."""
    gen = torch.Generator().manual_seed(int(f16))
    s_ot, base = 96, 4096  # out row stride (elements, even) and a 4-byte aligned base address
    operands, want = [], {}
    for lane in range(32):
        g, p = lane // 4, lane % 4
        vals, ptrs, masks = [], [], []
        for i in range(4):
            row, tok = 16 + g + 8 * (i // 2), 2 * p + i % 2
            v = float(torch.randn((), generator=gen))
            ok = tok != 7  # one masked-off token (odd), as when a segment ends
            vals.append(v)
            ptrs.append(base + 2 * (tok * s_ot + row))
            masks.append(int(ok))
            if ok:
                want[base // 2 + tok * s_ot + row] = v
        operands.append([0] * 4 + vals + ptrs + masks)
    got = _run_warp_asm(_red_pairs_asm(f16), operands)
    assert got == want


def test_tune_key_bounds_touched_slots_by_tokens():
    """A decode step of one token touches one slot however many are live: it is tuned (and may
    use split-K) as such, with no device read; bigger batches keep the live-slot class."""
    from deltahub.kernels._common import batch_class

    key = lambda t, active, given=False: tune_key(torch.bfloat16, 4096, 4096, 4, None, 64, t, active, given)  # noqa: E731
    assert key(1, 32) == key(1, 1) and key(1, 32)[-2] == batch_class(1)
    assert key(64, 32)[-2] == batch_class(32)  # enough tokens: the live slots bound it
    assert key(256, None)[-2] == batch_class(64)  # no hint: all 64 slots
    # a call given x's permuted copy does not pay the permute: tuned apart from one that does
    assert key(64, 32, True) != key(64, 32) and key(64, 32, True)[:-1] == key(64, 32)[:-1]


@pytest.mark.parametrize("fn", [permute_x, permute_x_torch])
def test_permute_x_makes_each_b_fragment_contiguous(fn):
    x = torch.arange(2 * 100, dtype=torch.float32).reshape(2, 100).to(torch.float16)
    xp = fn(x, 100)
    assert xp.dtype == torch.int32 and xp.shape == (2, 64)
    pairs = xp.view(torch.float16).reshape(2, 128)
    for c, p, i in [(0, 0, 0), (1, 3, 2), (3, 1, 3)]:  # sub-step c, lane column p, register i
        src = 32 * c + 2 * p + 8 * i
        got = pairs[1, 32 * c + 8 * p + 2 * i : 32 * c + 8 * p + 2 * i + 2].tolist()
        assert got == [float(x[1, q]) if q < 100 else 0.0 for q in (src, src + 1)]


@pytest.mark.parametrize(("t", "k"), [(3, 64), (5, 200), (1, 4096), (2, 37), (0, 64)])
def test_permute_x_kernel_matches_torch(t, k):
    """The Triton permute (one launch) against the torch ops, bf16, incl. padding; odd k and a view
    that is not 4-byte aligned must take the torch path (the kernel's int32 view of x would raise)."""
    x = torch.randn(t, k + 1).to(torch.bfloat16)
    for v in (x[:, :k].contiguous(), x.reshape(-1)[1 : 1 + t * k].reshape(t, k)):
        assert torch.equal(permute_x(v, k), permute_x_torch(v, k))


def test_sbmm_device_all_base_only_and_errors():
    lay = QuantLayout(4, "2:4")
    st = make_stack(2, 16, 64, lay, torch.Generator().manual_seed(1))
    dev = L.to_device_layout(st, lay, 16, 64)
    x = torch.randn(5, 64).to(torch.float16)
    out = torch.randn(5, 16).to(torch.float16)
    before = out.clone()
    none = torch.full((5,), -1, dtype=torch.int32)
    sbmm_device(x, dev["dw"], dev["scales"], none, bits=4, group_size=None, k=64, out=out)
    assert torch.equal(out, before)
    with pytest.raises(ShapeMismatchError):
        sbmm_device(x.float(), dev["dw"], dev["scales"], none, bits=4, group_size=None, k=64)
    with pytest.raises(ShapeMismatchError):  # 2-bit reading a 4-bit layout
        sbmm_device(x, dev["dw"], dev["scales"], none, bits=2, group_size=None, k=64)
    with pytest.raises(CodecError):
        sbmm_device(x, dev["dw"], dev["scales"], none, bits=3, group_size=None, k=64)
    with pytest.raises(ShapeMismatchError):  # x_perm must be permute_x(x, k)
        sbmm_device(x, dev["dw"], dev["scales"], none, bits=4, group_size=None, k=64, x_perm=x)


def test_package_dispatch_cpu_reference():
    lay = QuantLayout(2, "2:4", 64)
    gen = torch.Generator().manual_seed(4)
    st = make_stack(3, 20, 200, lay, gen)
    dev = L.to_device_layout(st, lay, 20, 200)
    x = torch.randn(6, 200, generator=gen)
    slot = torch.tensor([0, 2, -1, 1, 0, 2], dtype=torch.int32)
    got = K.sbmm_device(x, dev["dw"], dev["scales"], slot, bits=2, group_size=64, k=200)
    kw = dict(bits=2, sparse=True, group_size=64, k=200, meta=st["meta"])
    torch.testing.assert_close(got, reference.sbmm(x, st["qweight"], st["scales"], slot, **kw))

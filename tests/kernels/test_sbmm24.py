"""GPU slot layout (kernels/layout.py) and the SBMM kernel that reads it, under the Triton
interpreter (the plain-Triton decode; the PTX decode runs in test_gpu.py) vs the float32 reference."""

from __future__ import annotations

import pytest
import torch
from deltahub.kernels import layout as L
from deltahub.kernels import plan, reference
from deltahub.kernels.sbmm24 import Config, permute_x, sbmm_device

from deltahub import kernels as K
from deltahub.errors import CodecError, ShapeMismatchError
from deltahub.format import QuantLayout

from .kernel_cases import SPREADS, make_slots, make_stack

TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3}


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("k", [64, 300, 512])
def test_layout_round_trip_and_bytes(bits, k):
    lay = QuantLayout(bits, "2:4")
    st = make_stack(3, 9, k, lay, torch.Generator().manual_seed(bits + k))
    dev = L.to_device_layout(st, lay, 9, k)
    assert dev["dw"].dtype == torch.int16 and tuple(dev["dw"].shape) == (3, *L.device_shape(lay, 9, k))
    back = L.from_device_layout(dev, lay, 9, k)
    for name in ("qweight", "meta", "scales"):
        assert torch.equal(back[name], st[name]), name
    packed = sum(st[name][0].numel() * 4 for name in ("qweight", "meta"))
    if k % L.UNIT_K == 0:  # same bytes; else padded to whole units of 256 inputs
        assert dev["dw"][0].numel() * 2 == packed
    else:
        assert packed < dev["dw"][0].numel() * 2 <= packed + 9 * L.UNIT_K * (bits + 2) // 8


def test_layout_field_positions():
    """One group, decoded by hand from the documented bit positions."""
    lay = QuantLayout(4, "2:4")
    st = make_stack(1, 1, 256, lay, torch.Generator().manual_seed(3))
    dev = L.to_device_layout(st, lay, 1, 256)["dw"][0, 0].to(torch.int32) & 0xFFFF
    codes = K.reference.dequant_slot(
        0,
        st["qweight"],
        torch.ones_like(st["scales"]),
        bits=4,
        sparse=True,
        group_size=None,
        k=256,
        meta=st["meta"],
    )[0]
    for g in (0, 17, 38, 63):  # g = 16 s + w
        s, w = divmod(g, 16)
        word = dev[w] if s < 2 else dev[16 + w]
        c0, c1 = (word >> (8 * (s % 2))) & 15, (word >> (8 * (s % 2) + 4)) & 15
        keep = sum(((int(dev[32 + w]) >> L.mask_bit(s, j)) & 1) << j for j in range(4))
        dense = codes[4 * g : 4 * g + 4]
        pos = [j for j in range(4) if keep >> j & 1]
        assert len(pos) == 2 and [j for j in range(4) if dense[j] != 0] == pos
        assert float(dense[pos[0]]) == float(c0) - 7.5 and float(dense[pos[1]]) == float(c1) - 7.5


def test_layout_rejects_unsupported():
    with pytest.raises(CodecError):
        L.to_device_layout({}, QuantLayout(3, "2:4"), 4, 64)
    with pytest.raises(CodecError):
        L.to_device_layout({}, QuantLayout(4, "none"), 4, 64)
    assert not L.supported(QuantLayout(4, "2:4", 32)) and L.supported(QuantLayout(2, "2:4", 128))


def _run(
    bits, spread, dtype, *, t=13, s=4, n=70, k=300, group_size=None, seed=0, config=None, own_plan=False
):
    gen = torch.Generator().manual_seed(seed)
    lay = QuantLayout(bits, "2:4", group_size)
    st = make_stack(s, n, k, lay, gen)
    dev = L.to_device_layout(st, lay, n, k)
    x = torch.randn(t, k, generator=gen).to(dtype)
    slot = make_slots(spread, t, s, gen)
    kw = dict(bits=bits, sparse=True, group_size=group_size, k=k, meta=st["meta"])
    y = reference.sbmm(x.float(), st["qweight"], st["scales"], slot, **kw)
    init = (torch.randn(t, n, generator=gen) * 0.1).to(dtype)
    init[slot < 0] = float("nan")  # base-only rows must stay untouched, the others get exactly += y
    out = init.clone()
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
    )
    base = slot < 0
    assert bool(out[base].isnan().all()), "base-only row written"
    want, got = init[~base].float() + y[~base], out[~base].float()
    assert got.numel() > 0 and not got.isnan().any(), "a row with a slot was not written"
    err = (got - want).abs().max() / want.abs().max().clamp_min(1e-6)
    assert err <= TOL[dtype], f"max rel err {err:.2e}"


@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize("bits", [2, 4])
def test_sbmm_device_spreads(bits, spread):
    dtype = torch.bfloat16 if (bits // 2 + SPREADS.index(spread)) % 2 else torch.float16
    _run(bits, spread, dtype, seed=bits * 7 + SPREADS.index(spread))


@pytest.mark.parametrize(("bits", "group_size", "k"), [(4, 64, 300), (2, 128, 512), (4, 256, 700)])
def test_sbmm_device_group_scales(bits, group_size, k):
    _run(bits, "uniform", torch.float16, group_size=group_size, k=k, n=33)


def test_sbmm_device_even_shapes_several_blocks_and_plan():
    """K a multiple of the unit (loads without masks), several output blocks, a given plan."""
    _run(4, "zipf", torch.bfloat16, t=37, s=5, n=96, k=512, config=Config(16, 32, 4, 1), own_plan=True)
    _run(2, "hot_base", torch.float16, t=5, s=12, n=40, k=256, config=Config(32, 64, 4, 1))


@pytest.mark.parametrize(("bits", "k", "dtype"), [(4, 300, torch.bfloat16), (2, 512, torch.float16)])
def test_sbmm_device_permuted_x(bits, k, dtype):
    """x permuted once per call (contiguous x tiles), K padded to whole units when needed."""
    _run(bits, "uniform", dtype, t=11, n=40, k=k, config=Config(16, 32, 4, 1, xperm=True))


def test_permute_x_puts_each_phase_in_a_row():
    x = torch.arange(2 * 300, dtype=torch.float32).reshape(2, 300)
    xp = permute_x(x, 300)
    assert xp.shape == (2, 512) and bool((xp[:, 300:].sum(1) >= 0).all())
    for u, s, j in [(0, 0, 0), (0, 3, 1), (1, 0, 2)]:  # unit u, sub-phase s, phase j: 16 in a row
        want = [256 * u + 64 * s + 4 * w + j for w in range(16)]
        want = [x[0, k].item() if k < 300 else 0.0 for k in want]
        assert xp[0, 256 * u + 16 * (4 * s + j) : 256 * u + 16 * (4 * s + j) + 16].tolist() == want


def test_sbmm_device_split_k():
    """Split-K (units shared out over programs, partial products added atomically; fp16 only here:
    the interpreter has no bf16 atomics, test_gpu.py runs bf16)."""
    _run(4, "zipf", torch.float16, t=9, s=2, n=40, k=1100, config=Config(16, 32, 4, 1, 3))


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

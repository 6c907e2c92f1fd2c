"""SGMV (LoRA shrink/expand over slot segments) under the Triton interpreter vs the reference."""

from __future__ import annotations

import pytest
import torch
from deltahub.kernels import reference
from deltahub.kernels.sgmv import sgmv

from deltahub.errors import ShapeMismatchError

from .kernel_cases import SPREADS, make_slots

TOL = {torch.bfloat16: 2e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def _run(rank, spread, dtype, *, t=21, s=4, n=150, k=300, with_scale=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a = (torch.randn(s, rank, k, generator=gen) * 0.05).to(dtype)
    b = (torch.randn(s, n, rank, generator=gen) * 0.05).to(dtype)
    scale = torch.rand(s, generator=gen) + 0.5 if with_scale else None
    x = torch.randn(t, k, generator=gen).to(dtype)
    slot = make_slots(spread, t, s, gen)
    y = reference.sgmv(x.float(), a.float(), b.float(), slot, scale=scale)
    init = (torch.randn(t, n, generator=gen) * 0.01).to(dtype)
    init[slot < 0] = float("nan")
    out = init.clone()
    sgmv(x, a, b, slot, scale=scale, out=out)
    base = slot < 0
    assert bool(out[base].isnan().all()), "base-only row written"
    want = init[~base].float() + y[~base]
    got = out[~base].float()
    assert got.numel() > 0 and not got.isnan().any(), "a row with a slot was not written"
    err = (got - want).abs().max() / want.abs().max()
    assert err <= TOL[dtype], f"max err {err:.2e}"


@pytest.mark.parametrize("rank", [8, 16, 64, 128])
@pytest.mark.parametrize("spread", SPREADS)
def test_sgmv_ranks_and_spreads(rank, spread):
    dtype = torch.bfloat16 if (rank + SPREADS.index(spread)) % 2 else torch.float16
    _run(rank, spread, dtype, seed=rank + SPREADS.index(spread))


@pytest.mark.parametrize("t", [1, 5, 70])
def test_sgmv_fp32_odd_sizes_no_scale(t):
    _run(24, "uniform", torch.float32, t=t, s=3, n=33, k=100, with_scale=False)


def test_sgmv_shape_errors():
    x = torch.randn(3, 32)
    with pytest.raises(ShapeMismatchError):
        sgmv(x, torch.randn(2, 8, 16), torch.randn(2, 10, 8), torch.zeros(3, dtype=torch.int32))

"""Compiled kernels on a CUDA device vs the reference (run there with
``DELTAHUB_KERNELS_GPU=1 pytest -m gpu tests/kernels``): launch configs, layouts, SGMV."""

from __future__ import annotations

import os

import pytest
import torch
from deltahub.kernels import reference

from deltahub.format import QuantLayout

from .kernel_cases import make_slots, make_stack

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        not torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1",
        reason="needs CUDA and compiled (not interpreted) kernels",
    ),
]
LAYOUTS = [  # the ones the benchmark does not run first
    (3, "2:4", None),
    (4, "2:4", 128),
    (3, "none", 64),
    (1, "none", None),
    (8, "none", None),
    (4, "none", None),
    (2, "none", None),
    (4, "2:4", None),
    (2, "2:4", None),
]
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 2e-5}


def _check(layout, dtype, t, config, spread="zipf", s=16, n=304, k=1008):
    # sizes % 16 == 0 like the benchmark's, so both share compiled kernels; 304, 1008 still cut blocks
    from deltahub.kernels.sbmm_triton import sbmm

    gen = torch.Generator().manual_seed(t * 31 + layout.bits)
    st = {name: v.cuda() for name, v in make_stack(s, n, k, layout, gen).items()}
    x = torch.randn(t, k, generator=gen).to(dtype).cuda()
    slot = make_slots(spread, t, s, gen).cuda()
    kw = dict(
        bits=layout.bits,
        sparse=layout.sparse,
        group_size=layout.group_size,
        k=k,
        meta=st.get("meta"),
        qweight_hi=st.get("qweight_hi"),
    )
    y = reference.sbmm(x.float(), st["qweight"], st["scales"], slot, **kw)
    init = (torch.randn(t, n, generator=gen) * 0.1).to(dtype).cuda()
    init[slot < 0] = float("nan")
    out = init.clone()
    sbmm(x, st["qweight"], st["scales"], slot, **kw, out=out, config=config)
    torch.cuda.synchronize()
    base = slot < 0
    assert bool(out[base].isnan().all())
    want, got = init[~base].float() + y[~base], out[~base].float()
    assert not got.isnan().any()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err <= TOL[dtype], f"{layout} {dtype} T={t} {config}: max err {err:.2e}"


@pytest.mark.parametrize(("bits", "sparsity", "group_size"), LAYOUTS)
def test_gpu_sbmm_configs(bits, sparsity, group_size):
    """Every launch config on 4-bit 2:4; the other layouts on the first mode-3 and mode-0 configs."""
    from deltahub.kernels.sbmm_triton import DECODE_CONFIGS, PREFILL_CONFIGS

    layout = QuantLayout(bits, sparsity, group_size)
    if (bits, sparsity, group_size) == (4, "2:4", None):
        decode, prefill = DECODE_CONFIGS, PREFILL_CONFIGS
    else:
        decode, prefill = [next(c for c in DECODE_CONFIGS if c.mode == m) for m in (3, 0)], []
    for i, cfg in enumerate(decode):
        _check(layout, torch.bfloat16, 37, cfg, spread=("zipf", "unsorted")[i % 2])
    for cfg in prefill:
        _check(layout, torch.bfloat16, 700, cfg, spread="uniform")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_sbmm_autotuned_and_dispatch(dtype):
    import deltahub.kernels as K
    from deltahub.kernels.sbmm_triton import DECODE_CONFIGS

    layout = QuantLayout(4, "2:4")
    # bf16: autotuned over every config; fp32 (exact fp32 dot): one config, to bound compile time
    _check(layout, dtype, 64, None if dtype == torch.bfloat16 else DECODE_CONFIGS[0], spread="hot_base")
    gen = torch.Generator().manual_seed(0)
    st = {name: v.cuda() for name, v in make_stack(3, 64, 256, layout, gen).items()}
    x = torch.randn(9, 256, device="cuda", dtype=dtype)
    slot = torch.tensor([0, 1, 2, -1, 0, 1, 2, 2, 2], dtype=torch.int32, device="cuda")
    kw = dict(bits=4, sparse=True, group_size=None, k=256, meta=st["meta"])
    got = K.sbmm(x, st["qweight"], st["scales"], slot, **kw)
    want = reference.sbmm(x.float(), st["qweight"], st["scales"], slot, **kw)
    torch.testing.assert_close(
        got.float(), want, rtol=TOL[dtype] * 2, atol=TOL[dtype] * want.abs().max().item()
    )
    ids = torch.randint(0, 64, (9,), device="cuda")
    torch.testing.assert_close(
        K.embedding_delta(ids, st["qweight"], st["scales"], slot, **kw),
        reference.embedding_delta(ids, st["qweight"], st["scales"], slot, **kw),
    )


@pytest.mark.parametrize("rank", [8, 128])
@pytest.mark.parametrize("t", [5, 1500])
def test_gpu_sgmv(rank, t):
    import deltahub.kernels as K

    gen = torch.Generator().manual_seed(rank + t)
    s, n, k = 5, 700, 1100
    a = (torch.randn(s, rank, k, generator=gen) * 0.05).bfloat16().cuda()
    b = (torch.randn(s, n, rank, generator=gen) * 0.05).bfloat16().cuda()
    scale = (torch.rand(s, generator=gen) + 0.5).cuda()
    x = torch.randn(t, k, generator=gen).bfloat16().cuda()
    slot = make_slots("uniform", t, s, gen).cuda()
    got = K.sgmv(x, a, b, slot, scale=scale).float()
    want = reference.sgmv(x.float(), a, b, slot, scale=scale)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 2e-2

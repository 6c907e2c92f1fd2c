"""SBMM (and the embedding lookup) under the Triton interpreter vs the float32 reference."""

from __future__ import annotations

import pytest
import torch
from deltahub.kernels import plan, reference
from deltahub.kernels.embedding_triton import embedding_delta
from deltahub.kernels.sbmm import Config, sbmm

from deltahub.errors import CodecError, ShapeMismatchError
from deltahub.format import QuantLayout

from .kernel_cases import SPREADS, assert_added, make_slots, make_stack, poisoned

LAYOUTS = [
    (2, "2:4"),
    (3, "2:4"),
    (4, "2:4"),
    (2, "none"),
    (3, "none"),
    (4, "none"),
    (8, "none"),
    (1, "none"),
]
TOL = {torch.bfloat16: 1.5e-2, torch.float16: 2e-3, torch.float32: 1e-5}


def _run(layout, spread, dtype, *, t=13, s=4, n=70, k=200, config=None, seed=0, own_plan=False):
    gen = torch.Generator().manual_seed(seed)
    st = make_stack(s, n, k, layout, gen)
    x = torch.randn(t, k, generator=gen).to(dtype)
    slot = make_slots(spread, t, s, gen)
    kw = dict(
        bits=layout.bits,
        sparse=layout.sparse,
        group_size=layout.group_size,
        k=k,
        meta=st.get("meta"),
        qweight_hi=st.get("qweight_hi"),
    )
    y = reference.sbmm(x.float(), st["qweight"], st["scales"], slot, **kw)
    init, out = poisoned(t, n, slot, dtype, gen)
    sbmm(
        x,
        st["qweight"],
        st["scales"],
        slot,
        **kw,
        out=out,
        config=config,
        plan_=plan(slot, s) if own_plan else None,
    )
    assert_added(init, out, y, slot, TOL[dtype])

@pytest.mark.parametrize("spread", SPREADS)
@pytest.mark.parametrize(("bits", "sparsity"), LAYOUTS)
def test_sbmm_layouts_and_spreads(bits, sparsity, spread):
    dtype = torch.bfloat16 if (bits + SPREADS.index(spread)) % 2 else torch.float16
    _run(QuantLayout(bits, sparsity), spread, dtype, seed=bits * 7 + SPREADS.index(spread))


@pytest.mark.parametrize(("bits", "sparsity"), LAYOUTS)
@pytest.mark.parametrize(
    "config",
    [
        Config(4, 32, 128, 4, 1, 1),
        Config(4, 64, 128, 4, 1, 2),
        Config(16, 16, 64, 4, 1, 0),
        Config(8, 32, 64, 4, 1, 3),
    ],
)
def test_sbmm_fma_path_and_small_blocks(bits, sparsity, config):
    """FMA paths (expanded / gathered, 4-token tiles with empty slots skipped); small tensor-core
    tiles (several K steps, several output blocks); mode 3 (split by field, K step widened)."""
    _run(QuantLayout(bits, sparsity), "zipf", torch.bfloat16, t=11, n=40, k=300, config=config)


@pytest.mark.parametrize("group_size", [32, 128])
@pytest.mark.parametrize(("bits", "sparsity"), [(3, "2:4"), (4, "none"), (2, "2:4")])
@pytest.mark.parametrize(("block_k", "mode"), [(64, 0), (256, 0), (64, 2), (256, 2), (512, 3)])
def test_sbmm_group_scales(bits, sparsity, group_size, block_k, mode):
    """Scales per group: inside the tile (group < block) or once per K step (group >= block)."""
    cfg = Config(4 if mode == 2 else 16, 64, block_k, 4, 1, mode)
    _run(QuantLayout(bits, sparsity, group_size), "uniform", torch.float16, k=300, config=cfg)


@pytest.mark.parametrize(("bits", "sparsity"), [(4, "2:4"), (3, "2:4"), (3, "none")])
def test_sbmm_mode3_group_per_step_and_even_blocks(bits, sparsity):
    """Mode 3 with one group scale per K step (group 1024 = the step), several steps; and shapes that
    are multiples of the blocks, so the kernel loads without masks."""
    layout = QuantLayout(bits, sparsity, 1024)
    _run(layout, "zipf", torch.bfloat16, t=9, s=3, n=40, k=2100, config=Config(16, 32, 1024, 4, 1, 3))
    _run(
        QuantLayout(bits, sparsity),
        "uniform",
        torch.float16,
        t=9,
        s=3,
        n=64,
        k=2048,
        config=Config(16, 32, 1024, 4, 1, 3),
    )


@pytest.mark.parametrize("t", [1, 2, 37])
def test_sbmm_odd_token_counts_fp32(t):
    _run(QuantLayout(4, "2:4"), "uniform" if t == 1 else "unsorted", torch.float32, t=t, s=3, n=33, k=100)


def test_sbmm_many_slots_few_used_with_precomputed_plan():
    _run(QuantLayout(4, "2:4"), "hot_base", torch.bfloat16, t=9, s=12, own_plan=True, seed=5)


def test_sbmm_all_base_only_leaves_out_alone():
    gen = torch.Generator().manual_seed(1)
    st = make_stack(2, 16, 64, QuantLayout(4, "2:4"), gen)
    x = torch.randn(5, 64).to(torch.float16)
    out = torch.randn(5, 16).to(torch.float16)
    before = out.clone()
    sbmm(
        x,
        st["qweight"],
        st["scales"],
        torch.full((5,), -1, dtype=torch.int32),
        bits=4,
        sparse=True,
        group_size=None,
        k=64,
        meta=st["meta"],
        out=out,
    )
    assert torch.equal(out, before)


def test_sbmm_rejects_bad_arguments():
    gen = torch.Generator().manual_seed(2)
    st = make_stack(2, 16, 64, QuantLayout(4, "2:4"), gen)
    x = torch.randn(3, 64).to(torch.float16)
    slot = torch.zeros(3, dtype=torch.int32)
    kw = dict(bits=4, sparse=True, group_size=None, k=64)
    with pytest.raises(CodecError):
        sbmm(x, st["qweight"], st["scales"], slot, **kw)  # no meta
    with pytest.raises(ShapeMismatchError):
        sbmm(x[:, :32], st["qweight"], st["scales"], slot, **kw, meta=st["meta"])
    with pytest.raises(ShapeMismatchError):
        sbmm(
            x, st["qweight"], st["scales"], slot, bits=2, sparse=True, group_size=None, k=64, meta=st["meta"]
        )
    with pytest.raises(TypeError):
        sbmm(x, st["qweight"], st["scales"].double(), slot, **kw, meta=st["meta"])


@pytest.mark.parametrize(
    ("bits", "sparsity", "group_size"),
    [(4, "2:4", None), (3, "2:4", 64), (8, "none", 128), (1, "none", None), (2, "none", 32)],
)
def test_embedding_delta(bits, sparsity, group_size):
    gen = torch.Generator().manual_seed(bits)
    layout = QuantLayout(bits, sparsity, group_size)
    k, v, s = 300, 50, 3
    st = make_stack(s, v, k, layout, gen)
    ids = torch.randint(0, v, (23,), generator=gen)
    slot = make_slots("unsorted", 23, s, gen)
    kw = dict(
        bits=bits,
        sparse=layout.sparse,
        group_size=group_size,
        k=k,
        meta=st.get("meta"),
        qweight_hi=st.get("qweight_hi"),
    )
    out = torch.full((23, k), float("nan"))
    embedding_delta(ids, st["qweight"], st["scales"], slot, **kw, out=out)
    want = reference.embedding_delta(ids, st["qweight"], st["scales"], slot, **kw)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-7)
    assert bool((out[slot < 0] == 0).all()) and bool((out[slot >= 0] != 0).any())

"""Compiled kernels on a CUDA device vs the reference (run there with
``DELTAHUB_KERNELS_GPU=1 pytest -m gpu tests/kernels``): launch configs, layouts, SGMV."""

from __future__ import annotations

import os

import pytest
import torch
from deltahub.kernels import reference

from deltahub.format import QuantLayout

from .kernel_cases import assert_added, make_slots, make_stack, poisoned, used_slots

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
    from deltahub.kernels.sbmm import sbmm

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
    init, out = poisoned(t, n, slot, dtype, gen, "cuda")
    sbmm(x, st["qweight"], st["scales"], slot, **kw, out=out, config=config)
    assert_added(init, out, y, slot, TOL[dtype], f"{layout} {dtype} T={t} {config}")


@pytest.mark.parametrize(("bits", "sparsity", "group_size"), LAYOUTS)
def test_gpu_sbmm_configs(bits, sparsity, group_size):
    """Every launch config on 4-bit 2:4; the other layouts on the first mode-3 and mode-0 configs."""
    from deltahub.kernels.sbmm import DECODE_CONFIGS, PREFILL_CONFIGS

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
    from deltahub.kernels.sbmm import DECODE_CONFIGS

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


def _check_device_layout(bits, dtype, t, config, group_size=None, k=1024, n=304, s=16, spread="zipf"):
    from deltahub.kernels import layout as L
    from deltahub.kernels.sbmm24 import sbmm_device

    lay = QuantLayout(bits, "2:4", group_size)
    gen = torch.Generator().manual_seed(t * 7 + bits + k)
    st = {name: v.cuda() for name, v in make_stack(s, n, k, lay, gen).items()}
    dev = L.to_device_layout(st, lay, n, k)
    x = torch.randn(t, k, generator=gen).to(dtype).cuda()
    slot = make_slots(spread, t, s, gen).cuda()
    kw = dict(bits=bits, sparse=True, group_size=group_size, k=k, meta=st["meta"])
    y = reference.sbmm(x.float(), st["qweight"], st["scales"], slot, **kw)
    init, out = poisoned(t, n, slot, dtype, gen, "cuda")
    # zipf: the grid sized by the slots used, as the engine calls it (max_items); else by S
    active = used_slots(slot) if spread == "zipf" else None
    sbmm_device(
        x, dev["dw"], dev["scales"], slot, bits=bits, group_size=group_size, k=k, out=out, config=config,
        active=active,
    )  # fmt: skip
    # each split-K piece rounds the 16-bit output once (run G: max rel err 0.6-1.0 % at 8 pieces)
    tol = TOL[dtype] * (1 + ((config.split if config else 1) - 1) / 8)
    assert_added(init, out, y, slot, tol, f"bits={bits} {dtype} T={t} {config} g={group_size} k={k}")


@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_sbmm_device_asm_decode(bits, dtype):
    """The PTX decode vs the reference: every launch config in bf16 (the benchmark's compiled
    kernels), three in fp16 (the last decode config reads x directly); group scales; K not a
    multiple of the 256-input unit; autotuned."""
    from deltahub.kernels.sbmm24 import (
        DECODE_CONFIGS,
        PREFILL_CONFIGS,
        SPLIT_CONFIGS,
        STREAM_CONFIGS,
        TRIAL_CONFIGS,
    )

    decode = DECODE_CONFIGS + SPLIT_CONFIGS + STREAM_CONFIGS + TRIAL_CONFIGS
    if dtype == torch.float16:
        decode = [DECODE_CONFIGS[0], DECODE_CONFIGS[-1], STREAM_CONFIGS[0], *TRIAL_CONFIGS[:1]]
    for i, cfg in enumerate(decode):
        _check_device_layout(bits, dtype, 37, cfg, spread=("zipf", "unsorted")[i % 2])
    for cfg in PREFILL_CONFIGS if dtype == torch.bfloat16 else []:
        _check_device_layout(bits, dtype, 300, cfg, spread="uniform")
    for cfg in [DECODE_CONFIGS[0], next(c for c in DECODE_CONFIGS if c.stages), *TRIAL_CONFIGS[:1]]:
        _check_device_layout(bits, dtype, 21, cfg, group_size=128, k=1100)
    if dtype == torch.bfloat16:
        _check_device_layout(bits, dtype, 5, None, k=4096, n=512, spread="hot_base")
        _check_device_layout(bits, dtype, 21, SPLIT_CONFIGS[0], n=303)  # odd N: 16-bit atomics, not pairs


def test_gpu_delta_linear_slot_layout():
    """A DeltaLinear on CUDA keeps a 2:4 4-bit delta in the slot layout and adds it like the reference,
    with a step's SlotShare as without."""
    from deltahub.kernels.sbmm24 import DECODE_CONFIGS, permute_x, sbmm_device
    from deltahub.server.models.delta_linear import DeltaLinear
    from deltahub.server.models.slot_share import SlotShare

    from deltahub.format import PackedTensor

    lay = QuantLayout(4, "2:4")
    gen = torch.Generator().manual_seed(9)
    n, k, s = 96, 512, 3
    st = make_stack(2, n, k, lay, gen)
    lin = DeltaLinear(k, n, False, s, torch.bfloat16, torch.device("cuda"))
    lin.weight.data.normal_(0, 0.02)
    for i in range(2):
        p = PackedTensor("qlinear", (n, k), {name: v[i] for name, v in st.items()}, layout=lay)
        lin.prepare({"weight": p}, "w")
        lin.write_slot(i + 1, {"weight": p})
    pool = lin.pools()["weight"].q[(4, True, None)]
    assert "dw" in pool and "qweight" not in pool
    x = torch.randn(7, k, generator=gen).bfloat16().cuda()
    slot_idx = torch.tensor([1, 2, 0, 3, 1, 2, 3], device="cuda")  # 0: empty slot, 3 (= S): base only
    got = lin(x, slot_idx).float()
    base = x.float() @ lin.weight.float().T
    sl = torch.tensor([0, 1, -1, -1, 0, 1, -1], dtype=torch.int32)
    kw = dict(bits=4, sparse=True, group_size=None, k=k, meta=st["meta"])
    want = base + reference.sbmm(x.float().cpu(), st["qweight"], st["scales"], sl, **kw).cuda()
    assert ((got - want).abs().max() / want.abs().max()).item() < 2e-2
    # a step's share: the plan and the permuted x made once, reused by a second call and by a layer
    # with another live set (slot 2 only), which gets its own plan; same sums as without a share
    lin2 = DeltaLinear(k, n, False, s, torch.bfloat16, torch.device("cuda"))
    lin2.weight.data.normal_(0, 0.02)
    p = PackedTensor("qlinear", (n, k), {name: v[1] for name, v in st.items()}, layout=lay)
    lin2.prepare({"weight": p}, "w")
    lin2.write_slot(2, {"weight": p})
    share = SlotShare()
    for layer, alone in ((lin, got), (lin, got), (lin2, lin2(x, slot_idx).float())):
        shared = layer(x, slot_idx, share).float()  # split-K configs add pieces in any order: rounding
        assert ((shared - alone).abs().max() / alone.abs().max()).item() < 2e-2
    assert len(share._maps) == 2
    # the kernel reading a given permuted x (a config that does not read x itself)
    dev_slot = pool["map"][slot_idx]
    kw = dict(bits=4, group_size=None, k=k, config=DECODE_CONFIGS[0])
    one = sbmm_device(x, pool["dw"], pool["scales"], dev_slot, **kw)
    two = sbmm_device(x, pool["dw"], pool["scales"], dev_slot, **kw, x_perm=permute_x(x, k))
    assert torch.equal(one, two)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_norm_act_write_the_permuted_copy(dtype):
    """rms_norm / act_mul compiled: the reference's values (a unit in the last place: rsqrt and
    the sum's order), and the permuted copy bit-equal to permute_x of their own output."""
    from deltahub.kernels.norm_act import act_mul, rms_norm
    from deltahub.kernels.sbmm24 import permute_x

    gen = torch.Generator(device="cuda").manual_seed(1)
    tol = {"rtol": 2**-7 if dtype == torch.bfloat16 else 2**-10, "atol": 1e-3}
    for t, k in [(1, 4096), (37, 576), (64, 11008), (5, 1100)]:
        x = (3 * torch.randn(t, k, device="cuda", generator=gen)).to(dtype)
        w = (1 + 0.1 * torch.randn(k, device="cuda", generator=gen)).to(dtype)
        delta = 0.05 * torch.randn(5, k, device="cuda", generator=gen)
        delta[4] = 0
        slot = torch.randint(0, 5, (t,), device="cuda", generator=gen)
        y, yp = rms_norm(x, w, 1e-6, delta=delta, slot=slot, permute=True)
        want, _ = reference.rms_norm(x, w, 1e-6, delta=delta, slot=slot)
        torch.testing.assert_close(y, want, **tol)
        assert torch.equal(yp, permute_x(y, k))
        u = torch.randn(t, k, device="cuda", generator=gen).to(dtype)
        for act in ("silu", "gelu", "gelu_tanh"):
            h, hp = act_mul(x, u, act, permute=True)
            want, _ = reference.act_mul(x, u, act)
            torch.testing.assert_close(h, want, **tol)
            assert torch.equal(hp, permute_x(h, k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_paged_decode_attention(dtype):
    """The compiled decode attention vs the float32 reference on serving shapes: Llama-2-7B's 32
    heads of 128 (no GQA), GQA 4 with 128, SmolLM2's 9 heads over 3 of 64; contexts of 1 to
    2,000 tokens in shuffled blocks of 16; a sliding window; with and without split contexts."""
    from deltahub.kernels.attention import paged_decode_attention

    gen = torch.Generator(device="cuda").manual_seed(3)
    for h, hkv, dh, lens, window in [
        (32, 32, 128, [1, 17, 500, 2000], None),
        (32, 8, 128, [700, 64, 1999], None),
        (9, 3, 64, [300, 5, 1024, 77, 1], None),
        (32, 8, 128, [1500, 40], 256),
    ]:
        bs, per = 16, [-(-n // 16) for n in lens]
        n_blocks = sum(per) + 8
        ids = torch.randperm(n_blocks, device="cuda", generator=gen)
        tables, at = torch.zeros(len(lens), max(per), dtype=torch.int32, device="cuda"), 0
        for i, p in enumerate(per):
            tables[i, :p] = ids[at : at + p]
            at += p
        q = torch.randn(len(lens), h, dh, device="cuda", generator=gen).to(dtype)
        kc = torch.randn(n_blocks, bs, hkv, dh, device="cuda", generator=gen).to(dtype)
        vc = torch.randn(n_blocks, bs, hkv, dh, device="cuda", generator=gen).to(dtype)
        cl = torch.tensor(lens, device="cuda")
        want = reference.paged_decode_attention(q, kc, vc, tables, cl, dh**-0.5, window)
        for splits in (None, 1, 7):  # the shapes' choice, one program per pair, flash-decoding
            got = paged_decode_attention(q, kc, vc, tables, cl, dh**-0.5, window, splits=splits)
            err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
            assert err < (2e-2 if dtype == torch.bfloat16 else 4e-3), (h, hkv, dh, lens, window, splits, err)

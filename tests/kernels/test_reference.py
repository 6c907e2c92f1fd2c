"""The reference ops against a token-by-token loop over deltahub.format.dequantize, and the
package's CPU dispatch."""

from __future__ import annotations

import deltahub.kernels as K
import pytest
import torch
from deltahub.kernels import reference

from deltahub.format import PackedTensor, QuantLayout, dequantize

from .kernel_cases import make_slots, make_stack


def _delta(st, s, layout, n, k):
    parts = {name: t[s] for name, t in st.items()}
    return dequantize(PackedTensor("qlinear", (n, k), parts, layout=layout))


@pytest.mark.parametrize(
    ("bits", "sparsity", "group_size"),
    [
        (2, "2:4", None),
        (3, "2:4", 64),
        (4, "2:4", None),
        (4, "none", 32),
        (8, "none", None),
        (1, "none", None),
        (3, "none", None),
    ],
)
def test_reference_sbmm_matches_token_loop(bits, sparsity, group_size):
    gen = torch.Generator().manual_seed(bits)
    layout = QuantLayout(bits, sparsity, group_size)
    s, n, k, t = 3, 24, 100, 9
    st = make_stack(s, n, k, layout, gen)
    x = torch.randn(t, k, generator=gen)
    slot = make_slots("unsorted", t, s, gen)
    init = torch.randn(t, n, generator=gen)
    out = reference.sbmm(
        x,
        st["qweight"],
        st["scales"],
        slot,
        bits=bits,
        sparse=layout.sparse,
        group_size=group_size,
        k=k,
        meta=st.get("meta"),
        qweight_hi=st.get("qweight_hi"),
        out=init.clone(),
    )
    for i in range(t):
        want = init[i] if slot[i] < 0 else init[i] + _delta(st, int(slot[i]), layout, n, k) @ x[i]
        torch.testing.assert_close(out[i], want, rtol=1e-5, atol=1e-6)
    # the CPU dispatch of the package is the reference
    again = K.sbmm(
        x,
        st["qweight"],
        st["scales"],
        slot,
        bits=bits,
        sparse=layout.sparse,
        group_size=group_size,
        k=k,
        meta=st.get("meta"),
        qweight_hi=st.get("qweight_hi"),
        out=init.clone(),
    )
    torch.testing.assert_close(again, out)


def test_reference_embedding_and_sgmv_match_loops():
    gen = torch.Generator().manual_seed(3)
    layout = QuantLayout(4, "2:4", 64)
    s, v, k, t = 2, 30, 130, 7
    st = make_stack(s, v, k, layout, gen)
    ids = torch.randint(0, v, (t,), generator=gen)
    slot = make_slots("unsorted", t, s, gen)
    emb = K.embedding_delta(
        ids, st["qweight"], st["scales"], slot, bits=4, sparse=True, group_size=64, k=k, meta=st["meta"]
    )
    for i in range(t):
        want = torch.zeros(k) if slot[i] < 0 else _delta(st, int(slot[i]), layout, v, k)[ids[i]]
        torch.testing.assert_close(emb[i], want)
    a, b, sc = (
        torch.randn(s, 8, k, generator=gen),
        torch.randn(s, 20, 8, generator=gen),
        torch.rand(s, generator=gen),
    )
    x = torch.randn(t, k, generator=gen)
    y = K.sgmv(x, a, b, slot, scale=sc)
    for i in range(t):
        j = int(slot[i])
        want = torch.zeros(20) if j < 0 else sc[j] * (b[j] @ (a[j] @ x[i]))
        torch.testing.assert_close(y[i], want, rtol=1e-5, atol=1e-5)


def test_package_ops_stay_callable_after_importing_the_triton_modules():
    import importlib

    for name in ("sbmm", "sgmv", "embedding_triton"):
        importlib.import_module(f"deltahub.kernels.{name}")
    assert callable(K.sbmm) and callable(K.sgmv) and callable(K.embedding_delta) and callable(K.plan)

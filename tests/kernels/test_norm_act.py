"""rms_norm / act_mul (kernels/norm_act.py) under the interpreter against the torch reference, and
their permuted copy against ``permute_x_torch`` of their own output."""

from __future__ import annotations

import pytest
import torch
from deltahub.kernels import reference
from deltahub.kernels.layout import permute_x_torch
from deltahub.kernels.norm_act import act_mul, rms_norm

from deltahub.errors import ModelSourceError, ShapeMismatchError

TOL = {torch.bfloat16: 1 / 64, torch.float16: 1 / 512}  # a unit or two in the last place


def _close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    diff = (got.float() - want.float()).abs()
    assert torch.all(diff <= TOL[dtype] * want.float().abs() + 1e-3), diff.max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,k,with_delta", [(5, 100, True), (3, 128, False), (1, 64, True), (4, 576, True)])
def test_rms_norm_matches_reference(dtype, t, k, with_delta):
    gen = torch.Generator().manual_seed(k + t)
    x = (torch.randn(t, k, generator=gen) * 3).to(dtype)
    w = (1 + 0.1 * torch.randn(k, generator=gen)).to(dtype)
    s = 3
    delta = 0.05 * torch.randn(s + 1, k, generator=gen) if with_delta else None
    if delta is not None:
        delta[s] = 0  # row S: base-only tokens
    slot = torch.tensor([s, 0, 2, 1, s][:t]) if with_delta else None
    y, yp = rms_norm(x, w, 1e-5, delta=delta, slot=slot, permute=True)
    y_ref, yp_ref = reference.rms_norm(x, w, 1e-5, delta=delta, slot=slot, permute=True)
    _close(y, y_ref, dtype)
    assert torch.equal(yp, permute_x_torch(y, k))  # the same values, permuted, zero padding
    assert yp.shape == yp_ref.shape and yp.dtype == torch.int32
    y2, none = rms_norm(x, w, 1e-5, delta=delta, slot=slot)
    assert none is None and torch.equal(y2, y)


@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("t,n", [(3, 1100), (2, 64), (1, 2048)])
def test_act_mul_matches_reference(act, dtype, t, n):
    gen = torch.Generator().manual_seed(n)
    g = (2 * torch.randn(t, n, generator=gen)).to(dtype)
    u = torch.randn(t, n, generator=gen).to(dtype)
    h, hp = act_mul(g, u, act, permute=True)
    h_ref, _ = reference.act_mul(g, u, act)
    _close(h, h_ref, dtype)
    assert torch.equal(hp, permute_x_torch(h, n))
    h2, none = act_mul(g, u, act)
    assert none is None and torch.equal(h2, h)


def test_bad_inputs_raise_typed_errors():
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    w = torch.ones(64, dtype=torch.bfloat16)
    with pytest.raises(ShapeMismatchError):
        rms_norm(x, w[:32], 1e-5)
    with pytest.raises(ShapeMismatchError):
        rms_norm(x.float(), w.float(), 1e-5)
    with pytest.raises(ShapeMismatchError):  # delta without slot
        rms_norm(x, w, 1e-5, delta=torch.zeros(3, 64))
    with pytest.raises(ShapeMismatchError):
        act_mul(x, x[:, :32], "silu")
    with pytest.raises(ModelSourceError):
        act_mul(x, x, "relu2")


def test_empty_batch():
    x = torch.empty(0, 64, dtype=torch.bfloat16)
    y, yp = rms_norm(x, torch.ones(64, dtype=torch.bfloat16), 1e-5, permute=True)
    assert y.shape == (0, 64) and yp.shape == (0, 32)
    h, hp = act_mul(x, x, "silu", permute=True)
    assert h.shape == (0, 64) and hp.shape == (0, 32)

"""obs_block: the Triton kernel (interpreted on the CPU, compiled with DELTAHUB_KERNELS_GPU=1) against
the float32 torch reference, alone and inside the obs codec (group scales, padding, dead inputs).

Exact 2:4 saliency ties (zero rows, padding, dead inputs) go to the lower index in both; last-ulp
differences may still flip a rounding or a near-tie, so codes are compared allowing a tiny fraction
of mismatches, and the codec by its layer-output error."""

from __future__ import annotations

import deltahub.kernels as dk
import pytest
import torch
from deltahub.kernels import reference
from deltahub.kernels.obs_block_triton import obs_block

from deltahub.codecs import CodecSettings, get_codec
from deltahub.codecs.obs import inverse_cholesky
from deltahub.errors import ShapeMismatchError

GPU = torch.cuda.is_available()
DEV = "cuda" if GPU else "cpu"


def _problem(n: int, b: int, bits: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4 * b, b, generator=g) * torch.linspace(0.2, 3.0, b)  # uneven input scales
    u, _ = inverse_cholesky(2 * x.T @ x / x.shape[0], b, 0.01)
    w = torch.randn(n, b, generator=g) * 1e-3
    w[3] = 0  # a zero row: scale 0
    scale = w.abs().amax(1) * 0.9 / ((2**bits - 1) / 2)
    return w.to(DEV), u.to(DEV), scale.to(DEV)


@pytest.mark.parametrize("sparse", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("n, b", [(37, 128), (9, 64)])
def test_block_matches_reference(n, b, bits, sparse):
    w, u, scale = _problem(n, b, bits, seed=bits + 10 * b)
    w_before = w.clone()
    codes, keep, err = obs_block(w, u, scale, bits=bits, sparse=sparse)
    c0, k0, e0 = reference.obs_block(w.cpu(), u.cpu(), scale.cpu(), bits=bits, sparse=sparse)
    assert torch.equal(w, w_before)  # read only
    bad_rows = (codes.cpu() != c0).any(1)
    assert (codes.cpu() != c0).float().mean() <= 0.01
    assert not err[3].any() and not e0[3].any()  # the zero row (scale 0) stays exact
    if sparse:  # (the zero row's saliencies all tie: both take the lower indices)
        assert keep is not None
        kd = keep.cpu() != k0
        assert kd.float().mean() <= 0.01
        assert torch.equal(keep.reshape(n, -1, 4).sum(-1), torch.full((n, b // 4), 2, device=DEV))
        bad_rows |= kd.any(1)
    else:
        assert keep is None
    assert bad_rows.float().mean() <= 0.2
    good = ~bad_rows
    torch.testing.assert_close(err.cpu()[good], e0[good], rtol=1e-4, atol=1e-7)
    assert int(codes.max()) <= 2**bits - 1


@pytest.mark.parametrize("bits", [2, 4])
def test_fixed_mask_is_used_as_given(bits):
    """fixed_mask=True: the caller's 2:4 mask (here the opposite of what saliency picks) decides
    which entries are zero; codes and errors match the reference, the mask comes back unchanged."""
    n, b = 21, 64
    w, u, scale = _problem(n, b, bits, seed=bits)
    _, chosen, _ = reference.obs_block(w.cpu(), u.cpu(), scale.cpu(), bits=bits, sparse=True)
    mask = (~chosen).to(DEV)
    keep = mask.clone()
    codes, keep, err = obs_block(w, u, scale, bits=bits, sparse=True, keep=keep, fixed_mask=True)
    k0 = mask.cpu().clone()
    c0, _, e0 = reference.obs_block(w.cpu(), u.cpu(), scale.cpu(), bits=bits, sparse=True, keep=k0,
                                    fixed_mask=True)
    assert torch.equal(keep.cpu(), mask.cpu()) and torch.equal(k0, mask.cpu())
    assert (codes.cpu() != c0).float().mean() <= 0.01
    torch.testing.assert_close(err.cpu(), e0, rtol=1e-3, atol=1e-6)
    with pytest.raises(ShapeMismatchError, match="fixed_mask"):
        obs_block(w, u, scale, bits=bits, sparse=False, fixed_mask=True)


def test_column_major_outputs_and_a_block_narrower_than_its_tile():
    """obs.py passes transposed (column-major) output views; a width of 68 runs in a 128 tile."""
    n, b, bits = 21, 68, 4
    w, u, scale = _problem(n, b, bits, seed=5)
    codes = torch.full((b, n), 99, dtype=torch.uint8, device=DEV).t()
    keep = torch.zeros(b, n, dtype=torch.bool, device=DEV).t()
    err = torch.full((b, n), float("nan"), device=DEV).t()
    obs_block(w, u, scale, bits=bits, sparse=True, codes=codes, keep=keep, err=err)
    c0, k0, e0 = reference.obs_block(w.cpu(), u.cpu(), scale.cpu(), bits=bits, sparse=True)
    kd = keep.cpu() != k0
    assert (codes.cpu() != c0).float().mean() <= 0.01 and kd.float().mean() <= 0.01
    assert torch.isfinite(err).all() and int(codes.max()) <= 15
    torch.testing.assert_close(err.cpu(), e0, rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize("bad, match", [
    (dict(w=torch.zeros(4, 66)), "multiple of 4"),
    (dict(w=torch.zeros(4, 64, dtype=torch.float16)), "float32"),
    (dict(u=torch.zeros(32, 32)), "u must be"),
    (dict(scale=torch.zeros(5)), "scale must be"),
    (dict(codes=torch.zeros(4, 64, dtype=torch.int32)), "codes must be"),
    (dict(keep=torch.zeros(4, 60, dtype=torch.bool)), "keep must be"),
])
def test_shape_and_dtype_errors(bad, match):
    args = dict(w=torch.zeros(4, 64), u=torch.eye(64), scale=torch.ones(4), codes=None,
                keep=torch.zeros(4, 64, dtype=torch.bool))
    args.update(bad)
    if "w" in bad and bad["w"].shape[1] != 64:
        args["u"] = torch.eye(bad["w"].shape[1])
    with pytest.raises(ShapeMismatchError, match=match):
        obs_block(args["w"], args["u"], args["scale"], bits=4, sparse=True, codes=args["codes"],
                  keep=args["keep"])


@pytest.mark.parametrize("bits, sparsity, group", [(4, "2:4", None), (3, "2:4", 64), (2, "none", 64),
                                                    (4, "none", None)])
def test_codec_with_the_kernel_matches_the_reference_codec(monkeypatch, bits, sparsity, group):
    """ObsCodec through the Triton block (group scales: blocks cut at group starts; K = 200 is
    padded to 256; a dead input) against the same codec on the torch reference."""
    g = torch.Generator().manual_seed(bits)
    k, n = 200, 24
    x = torch.randn(600, k, generator=g) * torch.linspace(0.3, 2.0, k)
    x[:, 7] = 0  # dead input
    h = 2 * x.T @ x / x.shape[0]
    delta = torch.randn(n, k, generator=g) * 1e-3
    # the saliency mask (chosen in the kernel's column loop), pinned: mask="auto" draws a random
    # mask at >= 3 bits, which two compress calls (and CPU / CUDA generators) draw differently
    codec = get_codec("obs")(CodecSettings(bits, sparsity, group, {"mask": "obs"}))
    ref = codec.compress(delta, h)
    monkeypatch.setattr(dk, "obs_block", obs_block)  # the kernel, also for CPU tensors
    got = codec.compress(delta.to(DEV), h.to(DEV))
    for name, part in ref.parts.items():
        if name == "scales":  # later groups' scales come from error-updated weights: ulp differences
            torch.testing.assert_close(got.parts[name].cpu(), part, rtol=1e-3, atol=1e-9)
        else:  # packed words (8 codes or 16 positions each) equal but for rare rounding ties
            assert (got.parts[name].cpu() != part).float().mean() <= 0.05, name
    xh = torch.randn(300, k, generator=g) * torch.linspace(0.3, 2.0, k)

    def err(p):
        return float(((codec.decompress(p).cpu() - delta) @ xh.T).norm() / (delta @ xh.T).norm())

    assert err(got) <= 1.05 * err(ref) + 1e-6
    assert err(ref) <= 1.05 * err(got) + 1e-6

"""The obs and rtn codecs: interface, exact 2:4 structure, and obs's error feedback paying off."""

from __future__ import annotations

import re

import pytest
import torch

from deltahub import calibration
from deltahub import format as fmt
from deltahub.codecs import CODECS, CodecSettings, get_codec
from deltahub.codecs.obs import inverse_cholesky
from deltahub.errors import CodecError


def _layer_error(delta, approx, x):
    """Relative layer-output error ||X (Δ - Δ̂)ᵀ|| / ||X Δᵀ||; X [n, K]."""
    return float((x @ (delta - approx).T).norm() / (x @ delta.T).norm())


def test_registry_is_a_dict_and_unknown_names_are_listed():
    assert isinstance(CODECS, dict) and {"obs", "rtn"} <= set(CODECS)
    with pytest.raises(CodecError, match=r"known: .*obs.*rtn"):
        get_codec("gptq")


@pytest.mark.parametrize("settings, match", [
    (CodecSettings(bits=5), "bits"), (CodecSettings(sparsity="1:2"), "sparsity"),
    (CodecSettings(group_size=48), "group size"), (CodecSettings(options={"dampp": 0.1}), "dampp"),
])
def test_invalid_settings_are_refused(settings, match):
    with pytest.raises(CodecError, match=match):
        get_codec("obs")(settings)


@pytest.mark.parametrize("name", ["obs", "rtn"])
@pytest.mark.parametrize("bits, sparsity, group", [(2, "2:4", None), (3, "2:4", 64), (4, "none", 32),
                                                    (8, "none", None), (4, "2:4", None)])
def test_layout_and_exact_24(name, bits, sparsity, group):
    g = torch.Generator().manual_seed(bits)
    n, k = 48, 200  # K not a multiple of 64: padded
    delta = torch.randn(n, k, generator=g) * 1e-3
    x = torch.randn(512, k, generator=g)
    options = {"mask": "obs"} if name == "obs" else {}  # the error bound below is the saliency mask's
    codec = get_codec(name)(CodecSettings(bits, sparsity, group, options))
    packed = codec.compress(delta, 2 * x.T @ x / 512)
    assert packed.kind == "qlinear" and packed.shape == (n, k) and packed.layout.bits == bits
    approx = codec.decompress(packed)
    assert approx.shape == (n, k) and codec.nbytes(packed) == packed.nbytes
    if sparsity == "2:4":
        kept = (approx != 0).reshape(n, -1, 4)[:, : k // 4].sum(-1)
        assert bool((kept <= 2).all()) and float((kept == 2).float().mean()) > 0.99
    assert _layer_error(delta, approx, x) < {2: 0.9, 3: 0.85, 4: 0.8, 8: 0.05}[bits]


def test_obs_without_hessian_is_rtn():
    delta = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 1e-3
    s = CodecSettings(4, "2:4")
    assert torch.equal(get_codec("obs")(s).decompress(get_codec("obs")(s).compress(delta)),
                       get_codec("rtn")(s).decompress(get_codec("rtn")(s).compress(delta)))


@pytest.mark.parametrize("name", ["obs", "rtn"])
def test_zero_delta_stays_zero(name):
    codec = get_codec(name)(CodecSettings(4, "2:4"))
    packed = codec.compress(torch.zeros(8, 64), torch.eye(64))
    assert not codec.decompress(packed).any()


def test_obs_rows_are_independent():
    """The pipeline compresses tall matrices in row chunks: with the saliency mask the result must
    not depend on it (the random mask's draws follow the calls, so only its distribution does)."""
    g = torch.Generator().manual_seed(2)
    delta, x = torch.randn(40, 128, generator=g) * 1e-3, torch.randn(300, 128, generator=g)
    h = 2 * x.T @ x / 300
    codec = get_codec("obs")(CodecSettings(3, "2:4", 64, {"mask": "obs"}))
    whole = codec.decompress(codec.compress(delta, h))
    halves = torch.cat([codec.decompress(codec.compress(delta[:17], h)),
                        codec.decompress(codec.compress(delta[17:], h))])
    assert torch.equal(whole, halves)


def test_inverse_cholesky_handles_dead_and_singular_inputs():
    x = torch.randn(10, 64, generator=torch.Generator().manual_seed(3))
    x[:, 5] = 0  # a dead input
    h = 2 * x.T @ x / 10  # rank 10 < 64: singular without damping
    u, dead = inverse_cholesky(h, 128, 0.01)
    assert u.shape == (128, 128) and bool(dead[5]) and int(dead.sum()) == 1
    assert torch.isfinite(u).all() and torch.equal(u, torch.triu(u))
    with pytest.raises(CodecError):
        inverse_cholesky(torch.full((64, 64), float("nan")), 64, 0.01)


@pytest.fixture(scope="module")
def layer_inputs(toy_models, toy_tokenizer):
    """(Δ, X_calib, X_heldout) for layer 1's down_proj (K = 512) and q_proj (K = 256) of the
    'reverse' fine-tune: inputs recorded from the fine-tune on built-in calibration text."""
    from transformers import AutoModelForCausalLM

    ft = AutoModelForCausalLM.from_pretrained(str(toy_models["reverse"]), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(toy_models["base"]), dtype=torch.float32)
    ids = calibration.calibration_ids(toy_tokenizer, 24, 128)
    out = {}
    for name in ("model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"):
        xs = []
        hook = ft.get_submodule(name).register_forward_pre_hook(lambda _m, a, xs=xs: xs.append(a[0]))
        with torch.no_grad():
            ft(ids)
        hook.remove()
        x = xs[0].reshape(24, 128, -1)
        delta = ft.get_parameter(name + ".weight") - base.get_parameter(name + ".weight")
        out[name] = (delta.detach(), x[:16].reshape(-1, x.shape[-1]), x[16:].reshape(-1, x.shape[-1]))
    return out


@pytest.mark.parametrize("bits, sparsity, group", [(4, "2:4", None), (2, "2:4", None), (3, "none", 64),
                                                    (4, "none", None)])
def test_obs_beats_rtn_on_heldout_layer_output(layer_inputs, bits, sparsity, group):
    """Same bits and sparsity; error measured on held-out inputs. Without working error feedback
    obs degenerates to rtn with a saliency mask and this margin is not reached. obs with its
    saliency mask: the random mask (the default at >= 3 bits) has a larger layer error by design."""
    s = CodecSettings(bits, sparsity, group)
    for delta, xc, xh in layer_inputs.values():
        h = 2 * xc.T @ xc / xc.shape[0]
        obs = get_codec("obs")(CodecSettings(bits, sparsity, group, {"mask": "obs"}))
        rtn = get_codec("rtn")(s)
        e_obs = _layer_error(delta, obs.decompress(obs.compress(delta, h)), xh)
        e_rtn = _layer_error(delta, rtn.decompress(rtn.compress(delta)), xh)
        assert e_obs < 0.85 * e_rtn, (bits, sparsity, group, e_obs, e_rtn)


def test_scales_are_per_row_or_per_group():
    delta = torch.randn(16, 256, generator=torch.Generator().manual_seed(4))
    for group, g in ((None, 1), (64, 4), (128, 2)):
        p = get_codec("rtn")(CodecSettings(4, "none", group)).compress(delta)
        assert p.parts["scales"].shape == (16, g)
        assert fmt.dequantize(p).shape == (16, 256)


def test_scale_search_clips_heavy_tailed_rows_below_half_the_max():
    """At 2 bits the MSE-best clip of a heavy-tailed (Student-t, 3 dof) row is well below 0.5 x its
    absolute maximum; the search must reach it (a grid stopping at 0.52 costs far more error)."""
    from deltahub.codecs.base import search_scales

    torch.manual_seed(5)
    w = torch.distributions.StudentT(3.0).sample((64, 1024))
    s = search_scales(w, None, 2, torch.zeros(1024, dtype=torch.int64), 1)
    assert float((s[:, 0] * 1.5 / w.abs().amax(1)).median()) < 0.45

    def sq_error(scales):
        return float((fmt.dequantize_codes(fmt.quantize_codes(w, scales, 2), scales, 2) - w).square().sum())

    assert sq_error(s) < 0.8 * sq_error(w.abs().amax(1, keepdim=True) * 0.52 / 1.5)


def test_one_bit_scale_is_twice_the_mean_magnitude_of_the_kept_entries():
    """At 1 bit the codes are the signs whatever the scale, and ±mean|w| is the least-squares
    value: the search returns scale 2 mean|w| per (row, group) over the kept entries, with less
    error than any clipping ratio of the grid (on long heavy-tailed rows, far less: their mean|w|
    is below 0.12 absmax, where the grid stops)."""
    from deltahub.codecs.base import CLIP_RATIOS, search_scales

    torch.manual_seed(6)
    w = torch.distributions.StudentT(3.0).sample((32, 256))
    w[3] = 0.0  # a dead row keeps scale 0
    keep = torch.rand(32, 256) < 0.5
    gidx = torch.arange(256) // 128
    s = search_scales(w, keep, 1, gidx, 2)
    kept = keep.reshape(32, 2, 128)
    torch.testing.assert_close(s, 2 * (w.abs().reshape(32, 2, 128) * kept).sum(2) / kept.sum(2))
    assert bool((s[3] == 0).all())

    w = torch.distributions.StudentT(3.0).sample((32, 4096))
    s = search_scales(w, None, 1, torch.zeros(4096, dtype=torch.int64), 1)

    def row_error(scales):
        return (fmt.dequantize_codes(fmt.quantize_codes(w, scales, 1), scales, 1) - w).square().sum(1)

    absmax = w.abs().amax(1, keepdim=True)
    grid_best = torch.stack([row_error(absmax * r / 0.5) for r in CLIP_RATIOS]).amin(0)
    assert bool((row_error(s) <= grid_best).all())
    assert float(row_error(s).sum()) < 0.6 * float(grid_best.sum())


def test_act_order_permutes_whole_groups_and_stores_in_input_order():
    """Groups of 4 inputs are processed by decreasing Hessian diagonal, but the stored 2:4
    positions stay in the input order: compressing a delta whose inputs were permuted group-wise
    (with the Hessian permuted alike) gives the same values, permuted back."""
    from deltahub.codecs.obs import _permute_symmetric_, group_order

    g = torch.Generator().manual_seed(6)
    x = torch.randn(512, 128, generator=g) * torch.linspace(0.2, 3.0, 128)
    h = 2 * x.T @ x / 512
    perm = group_order(h, 128)
    assert sorted(perm.tolist()) == list(range(128))
    assert (perm.view(-1, 4) - perm.view(-1, 4)[:, :1] == torch.arange(4)).all()  # whole groups
    sums = h.diagonal()[perm].view(-1, 4).sum(1)
    assert (sums[:-1] >= sums[1:]).all()
    hp = h.clone()
    _permute_symmetric_(hp, perm, rows=7)
    assert torch.equal(hp, h[perm][:, perm])

    delta = torch.randn(24, 128, generator=g)
    codec = get_codec("obs")(CodecSettings(4, "2:4", None, {"mask": "obs"}))  # a mask from the data
    out = codec.decompress(codec.compress(delta, h))
    out_p = codec.decompress(codec.compress(delta[:, perm], h[perm][:, perm]))
    assert torch.allclose(out_p, out[:, perm], atol=1e-5)
    plain = get_codec("obs")(CodecSettings(4, "2:4", None, {"act_order": False, "mask": "obs"}))
    assert not torch.allclose(plain.decompress(plain.compress(delta, h)), out)


@pytest.mark.parametrize("group_size", [None, 32])
def test_obs_rescale_matches_the_signal_projection(group_size):
    """``rescale``: same codes and positions, scales x β per row so that Δ̂ H Δᵀ = Δ H Δᵀ
    (β within [0.5, 2]); 2:4 pruning by saliency shrinks the plain result, so β > 1 for most rows."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(1024, 128, generator=g) @ (torch.eye(128) + 0.3 * torch.randn(128, 128, generator=g))
    h = 2 * x.T @ x / 1024
    delta = torch.randn(40, 128, generator=g) * 1e-2
    plain = get_codec("obs")(CodecSettings(4, "2:4", group_size, {"mask": "obs"}))
    scaled = get_codec("obs")(CodecSettings(4, "2:4", group_size, {"rescale": True, "mask": "obs"}))
    p, s = plain.compress(delta, h), scaled.compress(delta, h)
    for part in ("qweight", "meta"):
        assert torch.equal(p.parts[part], s.parts[part])
    beta = s.parts["scales"] / p.parts["scales"]
    assert torch.allclose(beta, beta[:, :1].expand_as(beta), rtol=1e-5)  # one factor per row
    assert (beta[:, 0] > 1).float().mean() > 0.9 and (beta <= 2).all()
    q = scaled.decompress(s)
    num, den = ((delta @ h) * delta).sum(1), ((delta @ h) * q).sum(1)
    inside = (beta[:, 0] > 0.5) & (beta[:, 0] < 2)
    assert torch.allclose(den[inside], num[inside], rtol=1e-4)


def test_obs_random_mask_is_dare_with_error_feedback():
    """mask='random': a uniform 2:4 mask from the codec's seed, kept entries doubled; at 8 bits
    with an identity Hessian (no error to feed back) it is the doubled, masked delta itself; with
    a correlated Hessian the error feedback lowers the layer error against round-to-nearest on
    the same mask."""
    g = torch.Generator().manual_seed(9)
    delta = torch.randn(32, 128, generator=g) * 1e-2
    ident = torch.eye(128)
    eight = get_codec("obs")(CodecSettings(8, "2:4", None, {"mask": "random", "act_order": False}))
    out = eight.decompress(eight.compress(delta, ident))
    kept = out != 0
    assert torch.equal(kept.view(32, -1, 4).sum(-1), torch.full((32, 32), 2))
    assert torch.allclose(out[kept], 2 * delta[kept], atol=2 * delta.abs().max() / 127)
    again = get_codec("obs")(CodecSettings(8, "2:4", None, {"mask": "random", "act_order": False}))
    assert torch.equal(again.decompress(again.compress(delta, ident)) != 0, kept)  # seeded
    other = get_codec("obs")(CodecSettings(8, "2:4", None, {"mask": "random", "seed": 1}))
    assert not torch.equal(other.decompress(other.compress(delta, ident)) != 0, kept)

    x = torch.randn(2048, 128, generator=g) @ (torch.eye(128) + 0.4 * torch.randn(128, 128, generator=g))
    h = 2 * x.T @ x / 2048
    two = get_codec("obs")(CodecSettings(2, "2:4", None, {"mask": "random", "act_order": False}))
    q = two.decompress(two.compress(delta, h))
    mask = q != 0
    target = 2 * delta * mask  # what the mask keeps, doubled: the part quantization should preserve
    rtn = get_codec("rtn")(CodecSettings(2, "none", None)).decompress(
        get_codec("rtn")(CodecSettings(2, "none", None)).compress(target)) * mask

    def err(a):
        return float(((a - target) @ h * (a - target)).sum())

    assert err(q) < 0.7 * err(rtn)
    for bad, match in (({"mask": "magnitude"}, "mask must be"), ({"mask": "random", "_s": "none"}, "2:4")):
        sparsity = bad.pop("_s", "2:4")
        with pytest.raises(CodecError, match=match):
            get_codec("obs")(CodecSettings(4, sparsity, None, bad))


def _hessian(k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 0.3 * torch.randn(k, k, generator=g))
    return 2 * x.T @ x / 512


def _run(codec, delta, h) -> torch.Tensor:
    return codec.decompress(codec.compress(delta, h))


@pytest.mark.parametrize(("bits", "sparsity", "resolved"), [
    (1, "2:4", "obs"), (2, "2:4", "obs"), (3, "2:4", "random"), (4, "2:4", "random"), (8, "2:4", "random"),
    (2, "none", None), (4, "none", None),
])
def test_obs_default_mask_follows_the_bits(bits, sparsity, resolved):
    """mask="auto" (the default): the random 2:4 mask at >= 3 bits, the saliency mask at <= 2
    (the better one measured at 4 and at 2 bits), no mask for dense layouts. The resolved value is
    what ``describe()`` records (delta_config.json), and it is what runs: the default's output
    equals the explicit setting's and differs from the other mask's."""
    g = torch.Generator().manual_seed(10 + bits)
    delta = torch.randn(24, 128, generator=g) * 1e-2
    h = _hessian(128, bits)
    auto = get_codec("obs")(CodecSettings(bits, sparsity, None))
    assert auto.settings.options == {} and auto.options["mask"] == resolved
    assert auto.describe()["mask"] == resolved
    out = _run(auto, delta, h)
    if resolved is None:  # dense: explicit "obs" is accepted, recorded as given, and changes nothing
        explicit = get_codec("obs")(CodecSettings(bits, sparsity, None, {"mask": "obs"}))
        assert explicit.describe()["mask"] == "obs" and torch.equal(_run(explicit, delta, h), out)
        return
    same = get_codec("obs")(CodecSettings(bits, sparsity, None, {"mask": resolved}))
    other_mask = "random" if resolved == "obs" else "obs"
    other = get_codec("obs")(CodecSettings(bits, sparsity, None, {"mask": other_mask}))
    assert torch.equal(_run(same, delta, h), out)
    assert not torch.equal(_run(other, delta, h) != 0, out != 0)  # another 2:4 pattern


@pytest.mark.parametrize("bits", [2, 4])
def test_obs_explicit_mask_is_honoured(bits):
    """mask="obs" at any bits keeps the two largest saliencies of every four (identity Hessian, no
    act-order: saliency = w², no error to feed back); mask="random" at any bits does not, and the
    recorded option is the one asked for."""
    from deltahub.codecs.base import keep_two_of_four

    delta = torch.randn(32, 128, generator=torch.Generator().manual_seed(12)) * 1e-2
    ident = torch.eye(128)
    saliency = get_codec("obs")(CodecSettings(bits, "2:4", None, {"mask": "obs", "act_order": False}))
    rnd = get_codec("obs")(CodecSettings(bits, "2:4", None, {"mask": "random", "act_order": False}))
    assert (saliency.describe()["mask"], rnd.describe()["mask"]) == ("obs", "random")
    largest = keep_two_of_four(delta.abs())
    assert torch.equal(_run(saliency, delta, ident) != 0, largest)
    kept = _run(rnd, delta, ident) != 0
    assert torch.equal(kept.view(32, -1, 4).sum(-1), torch.full((32, 32), 2))
    assert float((kept == largest).float().mean()) < 0.7  # a random 2 of 4 agrees on half the entries


@pytest.mark.parametrize(("mask", "sparsity", "match"), [
    ("magnitude", "2:4", "obs: mask must be one of 'auto', 'obs', 'random', got 'magnitude'"),
    (None, "2:4", "obs: mask must be one of 'auto', 'obs', 'random', got None"),
    ("Random", "none", "got 'Random'"),
    ("random", "none", "obs: mask='random' needs sparsity 2:4"),
])
def test_obs_bad_mask_is_a_codec_error(mask, sparsity, match):
    with pytest.raises(CodecError, match=re.escape(match)):
        get_codec("obs")(CodecSettings(4, sparsity, None, {"mask": mask}))


def test_obs_default_random_mask_repeats_with_its_seed():
    """The 4-bit default draws its mask from ``seed``: two codecs with one seed give the same delta
    (tensor after tensor), another seed another mask."""
    g = torch.Generator().manual_seed(13)
    deltas = [torch.randn(16, 128, generator=g) * 1e-2 for _ in range(2)]
    h = _hessian(128, 13)

    def packs(options):
        codec = get_codec("obs")(CodecSettings(4, "2:4", None, options))
        return [codec.compress(d, h) for d in deltas]

    a, b, c = packs({}), packs({"seed": 0}), packs({"seed": 1})
    for pa, pb, pc in zip(a, b, c, strict=True):
        assert all(torch.equal(pa.parts[k], pb.parts[k]) for k in pa.parts)
        assert not torch.equal(pa.parts["meta"], pc.parts["meta"])
    assert not torch.equal(a[0].parts["meta"], a[1].parts["meta"])  # the generator moves on per tensor

"""The extra codecs (bitdelta, dare, lowrank) and held-out evaluation, on CPU with the toy models."""

from __future__ import annotations

import math

import pytest
import torch

from deltahub import format as fmt
from deltahub.codecs import CODECS, CodecSettings, get_codec
from deltahub.codecs.bitdelta import BitDeltaCodec, distill_scales
from deltahub.codecs.dare import DareCodec
from deltahub.codecs.lowrank import LowRankCodec, rank_for_budget
from deltahub.errors import CodecError

EXTRA = ("bitdelta", "dare", "lowrank")


def _delta(n: int, k: int, seed: int = 0, *, low: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(n, k, generator=g) * 1e-3
    if low:  # magnitudes bounded away from zero
        d = torch.sign(d) * (low + torch.rand(n, k, generator=g)) * 1e-3
    return d


@pytest.fixture(scope="module")
def deltas(toy_models, tmp_path_factory):
    """{method: delta folder} of the toy 'upper' fine-tune compressed with each extra codec."""
    from deltahub.compress import CompressConfig, compress

    root = tmp_path_factory.mktemp("extra")
    out = {}
    for m in EXTRA:
        compress(toy_models["base"], toy_models["upper"], root / m, CompressConfig(method=m), progress=False)
        out[m] = root / m
    return out


def test_registered_and_selectable():
    for m in EXTRA:
        assert get_codec(m) is CODECS[m]
    with pytest.raises(CodecError, match="lowrank"):
        get_codec("nope")


def test_bitdelta_is_sign_times_scale():
    d = _delta(96, 200, 1)
    d[0, :7] = 0.0
    p = BitDeltaCodec().compress(d)
    assert p.kind == "qlinear" and p.layout == fmt.QuantLayout(1, "none", None)
    scales = p.parts["scales"]
    assert scales.shape == (96, 1) and bool((scales == scales[0, 0]).all())
    alpha = d.abs().mean()
    out = fmt.dequantize(p)
    torch.testing.assert_close(out, torch.where(d >= 0, alpha, -alpha), rtol=1e-6, atol=0)
    # alpha = mean|Δ| is the least-squares scale for fixed signs
    err = lambda a: float((d - a * torch.where(d >= 0, 1.0, -1.0)).square().sum())  # noqa: E731
    assert err(alpha) < min(err(alpha * 0.9), err(alpha * 1.1))


def test_dare_two_of_four_random_and_rescaled():
    n, k = 256, 512
    d = _delta(n, k, 2, low=0.5)
    p = DareCodec(CodecSettings(bits=8, sparsity="2:4")).compress(d)
    out = fmt.dequantize(p)
    kept = out != 0
    assert bool((kept.reshape(n, k // 4, 4).sum(-1) == 2).all())
    # kept values are Δ / (1 - p) = 2Δ up to 8-bit rounding
    torch.testing.assert_close(out[kept], 2 * d[kept], atol=float(2 * d.abs().max()) / 100, rtol=0)
    # the kept pair of each group is uniform over the 6 possibilities, independent of magnitude
    pattern = (kept.reshape(-1, 4).to(torch.int64) * torch.tensor([1, 2, 4, 8])).sum(-1)
    freq = torch.bincount(pattern, minlength=16)[[3, 5, 6, 9, 10, 12]].float() / pattern.numel()
    assert bool(((freq - 1 / 6).abs() < 0.01).all()), freq
    mag_kept = (d.abs() * kept).sum() / kept.sum()
    assert abs(float(mag_kept / d.abs().mean()) - 1) < 0.02  # not magnitude pruning


@pytest.mark.parametrize("p", [0.1, 0.3, 0.7])
def test_dare_dense_drop_rate(p):
    n, k = 256, 1024
    d = _delta(n, k, 3, low=0.5)
    codec = DareCodec(CodecSettings(bits=8, sparsity="none", options={"p": p, "seed": 5}))
    packed = codec.compress(d)
    out = fmt.dequantize(packed)
    step = float(packed.parts["scales"].max())
    dropped = out.abs() <= step  # a dropped entry is stored as ±half a step
    assert abs(float(dropped.float().mean()) - p) < 0.01
    torch.testing.assert_close(out[~dropped], d[~dropped] / (1 - p), atol=step, rtol=0)
    # dropped entries are zero-mean, and the whole delta is unbiased
    assert abs(float(out[dropped].mean())) < 0.1 * step
    assert abs(float(out.sum() - d.sum())) < 0.05 * float(d.abs().sum())


def test_dare_refuses_other_rates_with_two_of_four():
    with pytest.raises(CodecError, match=r"p=0\.5"):
        DareCodec(CodecSettings(bits=4, sparsity="2:4", options={"p": 0.3}))


@pytest.mark.parametrize("bpw", [0.5, 2.0, 3.3])
def test_lowrank_respects_budget_and_is_optimal(bpw):
    n, k = 160, 384
    d = _delta(n, k, 4) + 1e-3 * torch.randn(n, 4) @ torch.randn(4, k)
    for dtype, elt in (("bfloat16", 2), ("float32", 4)):
        codec = LowRankCodec(CodecSettings(options={"bits_per_weight": bpw, "dtype": dtype}))
        p = codec.compress(d)
        r = p.parts["lora_A"].shape[0]
        assert p.kind == "lowrank" and p.parts["lora_B"].shape == (n, r) and p.parts["lora_A"].shape == (r, k)
        assert p.nbytes <= bpw * n * k / 8 < (n + k) * (r + 1) * elt  # fits, and r is the largest that does
        assert r == rank_for_budget(n, k, bpw, elt)
    # float32 factors reach the Eckart-Young optimum: the error is the tail of the spectrum
    s = torch.linalg.svdvals(d)
    err = float((d - fmt.dequantize(p)).square().sum())
    assert math.isclose(err, float(s[r:].square().sum()), rel_tol=1e-3)


def test_lowrank_fixed_rank_and_zero_budget():
    d = _delta(64, 128, 5)
    p = LowRankCodec(CodecSettings(options={"rank": 3})).compress(d)
    assert p.parts["lora_A"].shape == (3, 128) and p.info["rank"] == 3
    p0 = LowRankCodec(CodecSettings(options={"bits_per_weight": 0.01})).compress(d)
    assert p0.parts["lora_A"].shape == (0, 128) and bool((fmt.dequantize(p0) == 0).all())
    with pytest.raises(CodecError):
        LowRankCodec(CodecSettings(options={"rank": -1}))


def _logits(model_or_folder, ids):
    from transformers import AutoModelForCausalLM

    m = model_or_folder
    if not isinstance(m, torch.nn.Module):
        m = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32)
    with torch.no_grad():
        return m(input_ids=ids).logits


@pytest.mark.parametrize("method", EXTRA)
def test_round_trip_through_compress_and_reconstruct(method, deltas, toy_models, toy_tokenizer, tmp_path):
    from deltahub.checkpoint import Checkpoint
    from deltahub.reconstruct import reconstruct
    from deltahub.store import DeltaReader

    reader = DeltaReader(deltas[method])
    reader.verify()
    groups = reader.config.compression["groups"]
    assert groups["linear"]["codec"] == method
    kinds = {reader.read(n).kind for n in reader.names() if reader.config.tensors[n]["group"] == "linear"}
    assert kinds == ({"lowrank"} if method == "lowrank" else {"qlinear"})
    out = reconstruct(deltas[method], tmp_path / "rec", base=toy_models["base"], progress=False)
    # every reconstructed matrix is base + the stored Δ̂
    cb, cr = Checkpoint(toy_models["base"]), Checkpoint(out)
    name = "model.layers.1.mlp.down_proj.weight"
    want = (cb.get(name).float() + fmt.dequantize(reader.read(name))).to(cr.dtype(name))
    assert torch.equal(cr.get(name), want)
    # the delta is really applied: the reconstruction is closer to the fine-tune than the base is
    ids = toy_tokenizer("<|user|>the quick brown fox<|end|><|assistant|>", return_tensors="pt").input_ids
    ft, base, rec = (_logits(f, ids) for f in (toy_models["upper"], toy_models["base"], out))
    assert float((rec - ft).norm()) < 0.8 * float((base - ft).norm())


def test_bitdelta_scale_distillation_lowers_kl(deltas, toy_models, tmp_path):
    import shutil

    from deltahub.store import DeltaReader

    folder = tmp_path / "bd"
    shutil.copytree(deltas["bitdelta"], folder)
    name = "model.layers.0.self_attn.q_proj.weight"
    before = DeltaReader(folder).read(name).parts["scales"].clone()
    rec = distill_scales(
        folder,
        base=toy_models["base"],
        finetuned=toy_models["upper"],
        steps=12,
        samples=8,
        seq_len=64,
        batch_size=4,
        lr=0.05,
    )
    assert rec["tensors"] > 0 and rec["kl_last"] < rec["kl_first"]
    reader = DeltaReader(folder)
    reader.verify()
    after = reader.read(name).parts["scales"]
    assert not torch.equal(before, after) and bool((after == after[0, 0]).all())
    assert reader.config.compression["distill"]["steps"] == 12


def test_cli_selects_extra_methods(toy_models, tmp_path, capsys):
    from deltahub.cli.main import main

    rc = main(
        [
            "compress",
            "--base",
            str(toy_models["base"]),
            "--finetuned",
            str(toy_models["pirate"]),
            "--output",
            str(tmp_path / "d"),
            "--method",
            "lowrank",
        ]
    )
    assert rc == 0 and "wrote" in capsys.readouterr().out
    rc = main(
        [
            "compress",
            "--base",
            str(toy_models["base"]),
            "--finetuned",
            str(toy_models["pirate"]),
            "--output",
            str(tmp_path / "e"),
            "--method",
            "bogus",
        ]
    )
    assert rc == 1 and "bitdelta" in capsys.readouterr().err


def test_evaluate_delta_rows_and_in_memory_reconstruction(deltas, toy_models, toy_tokenizer, tmp_path):
    from safetensors.torch import load_file

    from deltahub import evaluate as ev
    from deltahub.reconstruct import reconstruct

    d = deltas["dare"]
    out = reconstruct(d, tmp_path / "rec", base=toy_models["base"], progress=False)
    ref = load_file(str(out / "model.safetensors"))
    mem = ev.reconstructed_state(d, toy_models["base"])
    assert set(ref) == set(mem) and all(torch.equal(ref[k], mem[k]) for k in ref)

    text = tmp_path / "eval.txt"
    text.write_text(
        "".join(
            f"<|user|>{w}<|end|><|assistant|>{w.upper()}<|end|>"
            for w in ["alpha beta", "gamma delta", "quick brown fox", "lazy dog"] * 20
        )
    )
    rows = ev.evaluate_delta(d, finetuned=toy_models["upper"], eval_data=[text], device="cpu", seq_len=128)
    assert len(rows) == 1
    r = rows[0]
    assert set(r) == {"dataset", "tokens", "metric", "base", "fine-tune", "reconstructed", "vs fine-tune"}
    assert r["dataset"] == "eval.txt" and r["tokens"] > 100
    # on text of the fine-tune's task the fine-tune and its reconstruction beat the base
    assert r["fine-tune"] < r["base"] and r["reconstructed"] < r["base"]
    assert abs(r["reconstructed"] / r["fine-tune"] - 1) < 0.5 * abs(r["base"] / r["fine-tune"] - 1)


def test_perplexity_matches_transformers_loss(toy_models, toy_tokenizer):
    from deltahub import evaluate as ev

    model = ev.load_model(toy_models["base"])
    ids = ev.load_tokens(None, toy_tokenizer, max_tokens=300)
    ppl, n = ev.perplexity(model, ids, seq_len=100, batch_size=2)
    assert n == 3 * 99
    with torch.no_grad():
        losses = [float(model(input_ids=w[None], labels=w[None]).loss) for w in ids.view(3, 100)]
    assert math.isclose(ppl, math.exp(sum(losses) / 3), rel_tol=1e-5)

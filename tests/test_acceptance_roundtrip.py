"""Acceptance (issue 2): round trip through compress + reconstruct, and payload sizes.

Runs on the trained toy models (tests/conftest.py): hidden 256, intermediate 512, 2 layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltahub import toy
from deltahub.compress import CompressConfig, compress
from deltahub.reconstruct import reconstruct

N_PROMPTS, N_NEW = 8, 16


def _load(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _roundtrip(toy_models, task: str, root: Path, cfg: CompressConfig) -> Path:
    delta, out = root / f"{task}-delta", root / f"{task}-model"
    compress(toy_models["base"], toy_models[task], delta, cfg, progress=False)
    reconstruct(delta, out, base=toy_models["base"], progress=False)
    return out


def _prompt_ids(tokenizer, task: str) -> list[torch.Tensor]:
    """Chat prompts of ``task`` the fine-tune never saw (it was trained on seed 0)."""
    prompts = [e["prompt"] for e in toy.task_examples(task, N_PROMPTS, seed=123)]
    return [tokenizer(toy.chat_text(p), add_special_tokens=False, return_tensors="pt")["input_ids"]
            for p in prompts]


@torch.no_grad()
def _greedy(model, ids: torch.Tensor, n: int = N_NEW) -> torch.Tensor:
    """ids [1, L] -> [1, L + n]: greedy continuation (no stopping at <|end|>)."""
    for _ in range(n):
        ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


@torch.no_grad()
def _agreement(model, continuations: list[torch.Tensor]) -> float:
    """Fraction of the reference's greedy tokens that ``model`` also picks greedily, given the same
    prefix (teacher-forced, so one early difference does not hide all later agreement)."""
    hits = [(model(c[:, :-1]).logits[0, -N_NEW:].argmax(-1) == c[0, -N_NEW:]).float().mean()
            for c in continuations]
    return float(torch.stack(hits).mean())


def test_rtn_8bit_dense_logits_match_finetune(toy_models, toy_tokenizer, tmp_path):
    """8-bit, no sparsity: |logits - fine-tune's| must stay below 2 % of the base-vs-fine-tune gap.

    Why 2 %: an 8-bit symmetric grid with a per-row scale has a step of absmax/127.5, so each Δ
    entry is off by <= ~0.4 % of its row's largest |Δ|; the logit error should be a small
    fraction of what Δ itself moves the logits (measured ~0.2 %). Dropping or misapplying Δ
    gives ~100 %, a 4-bit 2:4 delta ~45 %: both fail.
    """
    from transformers import AutoTokenizer

    out = _roundtrip(toy_models, "upper", tmp_path, CompressConfig(method="rtn", bits=8, sparsity="none"))
    model, ft, base = _load(out), _load(toy_models["upper"]), _load(toy_models["base"])
    assert model.config.to_dict()["architectures"] == ft.config.to_dict()["architectures"]
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.chat_template == toy_tokenizer.chat_template and len(tok) == len(toy_tokenizer)
    err = gap = err_norm = gap_norm = 0.0
    with torch.no_grad():
        for ids in _prompt_ids(toy_tokenizer, "upper"):
            lf, lr, lb = ft(ids).logits, model(ids).logits, base(ids).logits
            err, gap = max(err, float((lr - lf).abs().max())), max(gap, float((lb - lf).abs().max()))
            err_norm += float((lr - lf).norm())
            gap_norm += float((lb - lf).norm())
    print(f"\n8-bit dense: max |logit err| {err:.4f}, base-vs-fine-tune gap {gap:.3f}, "
          f"relative norm {err_norm / gap_norm:.4f}")
    assert gap > 1.0  # the fine-tune really differs from its base
    assert err <= 0.02 * gap
    assert err_norm <= 0.01 * gap_norm


def test_obs_4bit_24_greedy_agrees_with_finetune(toy_models, toy_tokenizer, tmp_path):
    """4-bit 2:4 obs: token agreement with the fine-tune's greedy continuations >= 0.8 and at
    least 0.3 above the base's (8 held-out prompts x 16 tokens). Measured 0.93 vs base 0.45 on
    'reverse' (0.92 vs 0.0 on 'upper'); a lost delta scores the base's agreement, a 4-bit 2:4
    rtn delta ~0.8. With obs's saliency mask: the 4-bit default's random mask scores 0.805 here
    (these tiny 2-layer fine-tunes favour the saliency mask; real ones do not, docs/benchmarks)."""
    task = "reverse"
    cfg = CompressConfig(method="obs", bits=4, sparsity="2:4", calibration_samples=16, seq_len=64,
                         options={"mask": "obs"})
    out = _roundtrip(toy_models, task, tmp_path, cfg)
    model, ft, base = _load(out), _load(toy_models[task]), _load(toy_models["base"])
    conts = [_greedy(ft, ids) for ids in _prompt_ids(toy_tokenizer, task)]
    ours, theirs = _agreement(model, conts), _agreement(base, conts)
    print(f"\n{task}: greedy agreement with the fine-tune: obs 4-bit 2:4 {ours:.3f}, base {theirs:.3f}")
    assert ours >= 0.8
    assert ours >= theirs + 0.3


@pytest.mark.parametrize(("bits", "minimum"), [(4, 5.0), (2, 7.0)])
def test_payload_ratio_vs_bf16(toy_models, tmp_path, bits, minimum):
    """Whole-model payload (every delta*.safetensors file, headers included) vs the fine-tune in
    bf16, 2:4 with the zstd stage: >= 5x at 4 bits, >= 7x at 2 bits."""
    from deltahub.checkpoint import Checkpoint

    ck = Checkpoint(toy_models["upper"])
    mats = [ck.shape(n) for n in ck.names() if len(ck.shape(n)) == 2]
    assert mats and min(s[1] for s in mats) >= 256  # the "matrices >= 256 wide" (inputs)
    bf16 = 2 * sum(info.numel for info in ck.infos.values())
    dcfg = compress(toy_models["base"], toy_models["upper"], tmp_path / "d",
                    CompressConfig(method="rtn", bits=bits, sparsity="2:4", lossless="zstd"), progress=False)
    files = sorted((tmp_path / "d").glob("delta*.safetensors"))
    on_disk = sum(f.stat().st_size for f in files)
    ratio = bf16 / on_disk
    print(f"\n{bits}-bit 2:4 + zstd: payload {on_disk} B on disk ({dcfg.stats['payload_bytes']} B arrays), "
          f"fine-tune bf16 {bf16} B, ratio {ratio:.2f}x (recorded {dcfg.stats['ratio_vs_bf16']}x)")
    assert dcfg.stats["finetuned_bf16_bytes"] == bf16
    assert dcfg.stats["payload_bytes"] <= on_disk
    assert ratio >= minimum
    assert dcfg.stats["ratio_vs_bf16"] >= ratio

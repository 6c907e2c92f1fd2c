"""Scale distillation of a finished delta (deltahub.distill): per-scale factors for qlinear codecs."""

from __future__ import annotations

import shutil

import torch

from deltahub.distill import distill_scales
from deltahub.reconstruct import reconstruct
from deltahub.store import DeltaReader


def _kl_to_finetune(model_dir, finetuned, ids) -> float:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        p = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)(input_ids=ids).logits
        q = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32)(input_ids=ids).logits
    return float(torch.nn.functional.kl_div(p.log_softmax(-1).flatten(0, 1), q.log_softmax(-1).flatten(0, 1),
                                            log_target=True, reduction="batchmean"))


def test_per_scale_distillation_of_a_24_delta_lowers_kl(toy_models, toy_deltas, toy_tokenizer, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(toy_deltas["upper"], folder)
    name = "model.layers.0.mlp.down_proj.weight"
    before = DeltaReader(folder).read(name)
    prompts = ["<|user|>hello there, how are you<|end|><|assistant|>",
               "<|user|>the quick brown fox jump<|end|><|assistant|>"]
    ids = toy_tokenizer(prompts, return_tensors="pt").input_ids
    kl0 = _kl_to_finetune(reconstruct(folder, tmp_path / "r0", base=toy_models["base"], progress=False),
                          toy_models["upper"], ids)
    rec = distill_scales(folder, base=toy_models["base"], finetuned=toy_models["upper"], steps=30,
                         samples=8, seq_len=64, batch_size=4, lr=0.02, per_matrix=False)
    assert rec["tensors"] > 0 and rec["factors"] > rec["tensors"]  # one factor per row, not per matrix
    reader = DeltaReader(folder)
    reader.verify()
    after = reader.read(name)
    assert torch.equal(after.parts["qweight"], before.parts["qweight"])  # codes and 2:4 positions kept
    assert torch.equal(after.parts["meta"], before.parts["meta"])
    ratio = after.parts["scales"] / before.parts["scales"]
    assert ratio.std() > 1e-4  # rows moved independently
    assert reader.config.compression["distill"]["steps"] == 30
    kl1 = _kl_to_finetune(reconstruct(folder, tmp_path / "r1", base=toy_models["base"], progress=False),
                          toy_models["upper"], ids)
    assert kl1 < 0.9 * kl0, (kl0, kl1)


def test_per_matrix_distillation_moves_every_row_of_a_matrix_alike(toy_models, toy_deltas, tmp_path):
    """By default every qlinear codec gets bitdelta's granularity: one factor per matrix (rows keep
    their ratios), at learning rate 0.02."""
    folder = tmp_path / "d"
    shutil.copytree(toy_deltas["upper"], folder)
    name = "model.layers.0.mlp.down_proj.weight"
    before = DeltaReader(folder).read(name)
    rec = distill_scales(folder, base=toy_models["base"], finetuned=toy_models["upper"], steps=5,
                         samples=8, seq_len=64, batch_size=4)
    assert rec["factors"] == rec["tensors"] and rec["lr"] == 0.02 and rec["per_matrix"]
    ratio = DeltaReader(folder).read(name).parts["scales"] / before.parts["scales"]
    first = float(ratio.flatten()[0])
    assert float((ratio - first).abs().max()) < 1e-5 and abs(first - 1) > 1e-4


def test_compress_distill_steps_option(toy_models, tmp_path):
    from deltahub.cli.main import main

    out = tmp_path / "d"
    rc = main(["compress", "--base", str(toy_models["base"]), "--finetuned", str(toy_models["upper"]),
               "--output", str(out), "--method", "rtn", "--bits", "2", "--distill-steps", "3"])
    assert rc == 0
    cfg = DeltaReader(out).config
    assert cfg.compression["distill"]["steps"] == 3 and cfg.compression["distill"]["per_matrix"]
    assert cfg.stats["payload_bytes"] == sum(r["stored_bytes"] for r in cfg.storage.values())
    assert main(["compress", "--base", str(toy_models["base"]), "--finetuned", str(toy_models["upper"]),
                 "--output", str(tmp_path / "r"), "--method", "rtn", "--bits", "2", "--distill-steps", "2",
                 "--distill-per-row"]) == 0
    assert not DeltaReader(tmp_path / "r").config.compression["distill"]["per_matrix"]
    assert main(["compress", "--base", str(toy_models["base"]), "--finetuned", str(toy_models["upper"]),
                 "--output", str(tmp_path / "e"), "--distill-steps", "-1"]) == 1

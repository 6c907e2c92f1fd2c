"""compress -> reconstruct round trips on the trained toy models, checkpoint streaming,
fingerprints, and the errors users see for bad inputs."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltahub import toy
from deltahub.checkpoint import Checkpoint
from deltahub.compress import CompressConfig, compress
from deltahub.errors import (
    BaseMismatchError,
    DeltaFormatError,
    ModelSourceError,
    ShapeMismatchError,
    UsageError,
)
from deltahub.fingerprint import combine, fingerprint
from deltahub.reconstruct import reconstruct
from deltahub.store import CONFIG_NAME, DeltaReader

OBS = CompressConfig(method="obs", bits=4, sparsity="2:4", calibration_samples=16, seq_len=128)


def _load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()


def _variant(src: Path, dst: Path, edit_tensors, edit_config) -> Path:
    """Copy a toy model folder, editing its state dict and config."""
    shutil.copytree(src, dst)
    sd = load_file(str(dst / "model.safetensors"))
    save_file(edit_tensors(sd), str(dst / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((dst / "config.json").read_text())
    edit_config(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.fixture(scope="module")
def obs_delta(toy_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("obs")
    cfg = compress(toy_models["base"], toy_models["upper"], root / "delta", OBS, progress=False)
    out = reconstruct(root / "delta", root / "model", progress=False)  # base as recorded
    return cfg, root / "delta", out


@torch.no_grad()
def _agreement(model, ref, tokenizer, task: str) -> float:
    """Teacher-forced top-1 agreement with ``ref`` on ref's own greedy continuations of unseen prompts."""
    hits = []
    for e in toy.task_examples(task, 12, seed=4321):
        text = toy.chat_text(e["prompt"])
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        seq = ref.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0, eos_token_id=None)
        n = seq.shape[1] - ids.shape[1]
        hits.append((model(seq[:, :-1]).logits[0, -n:].argmax(-1) == seq[0, -n:]).float().mean())
    return float(torch.stack(hits).mean())


def test_obs_roundtrip_greedy_agrees_with_finetune(obs_delta, toy_models, toy_tokenizer):
    _, delta, out = obs_delta
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (out / name).is_file() and (delta / name).is_file()
    ft = _load(toy_models["upper"])
    rec, base = _load(out), _load(toy_models["base"])
    a_rec, a_base = _agreement(rec, ft, toy_tokenizer, "upper"), _agreement(base, ft, toy_tokenizer, "upper")
    # measured: reconstruction ~0.9, base ~0.0; a lost or misapplied delta falls to the base's level
    assert a_rec >= 0.7 and a_rec >= a_base + 0.5, (a_rec, a_base)


def test_delta_config_records_models_settings_and_sizes(obs_delta, toy_models):
    cfg, delta, _ = obs_delta
    assert cfg.base_model.fingerprint == fingerprint(toy_models["base"])
    assert cfg.finetuned_model.fingerprint == fingerprint(toy_models["upper"])
    assert cfg.architectures == ["LlamaForCausalLM"] and not cfg.tie_word_embeddings
    groups = {t["group"] for t in cfg.tensors.values()}
    assert groups == {"linear", "embedding", "lm_head", "other"}
    assert cfg.compression["groups"]["linear"]["codec"] == "obs"
    recorded = cfg.compression["groups"]  # obs's default mask="auto", recorded as resolved: random at 4 bits
    assert recorded["linear"]["mask"] == recorded["lm_head"]["mask"] == "random"
    assert cfg.compression["groups"]["embedding"]["codec"] == "rtn"  # a lookup has no Hessian
    assert cfg.compression["calibration"] == {"data": "builtin", "samples": 16, "seq_len": 128}
    n = sum(t.numel() for t in load_file(str(toy_models["upper"] / "model.safetensors")).values())
    stored = sum(r["stored_bytes"] for r in DeltaReader(delta).config.storage.values())
    assert cfg.stats["finetuned_bf16_bytes"] == 2 * n and cfg.stats["payload_bytes"] == stored
    assert (delta / "delta.safetensors").stat().st_size >= stored
    assert cfg.stats["ratio_vs_bf16"] == pytest.approx(2 * n / stored, rel=1e-3)
    assert 2 * n / stored >= 5.0  # 4-bit 2:4 with the lossless stage


def test_2bit_24_ratio(toy_models, tmp_path):
    cfg = compress(toy_models["base"], toy_models["double"], tmp_path / "d",
                   CompressConfig(method="rtn", bits=2, sparsity="2:4"), progress=False)
    n = sum(t.numel() for t in load_file(str(toy_models["double"] / "model.safetensors")).values())
    assert 2 * n / cfg.stats["payload_bytes"] >= 7.0


def test_8bit_dense_logits_close(toy_models, toy_tokenizer, tmp_path):
    compress(toy_models["base"], toy_models["pirate"], tmp_path / "d",
             CompressConfig(method="rtn", bits=8, sparsity="none"), progress=False)
    out = reconstruct(tmp_path / "d", tmp_path / "m", base=toy_models["base"], progress=False)
    ids = toy_tokenizer(toy.chat_text("print the sorted list"), return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ft, rec, base = (_load(p)(ids).logits for p in (toy_models["pirate"], out, toy_models["base"]))
    assert float((rec - ft).abs().max()) < 0.03 * float((base - ft).abs().max())


def test_added_tokens_are_stored_whole(toy_models, tmp_path):
    def grow(sd):
        g = torch.Generator().manual_seed(0)
        for k in ("model.embed_tokens.weight", "lm_head.weight"):
            sd[k] = torch.cat([sd[k], torch.randn(3, sd[k].shape[1], generator=g) * 0.02])
        return sd

    ft = _variant(toy_models["reverse"], tmp_path / "ft", grow, lambda c: c.update(vocab_size=323))
    cfg = compress(toy_models["base"], ft, tmp_path / "d", OBS, progress=False)
    emb = DeltaReader(tmp_path / "d").read("model.embed_tokens.weight")
    assert emb.shape == (320, 256) and emb.parts["extra_rows"].shape == (3, 256)
    assert cfg.tensors["lm_head.weight"]["parts"].count("extra_rows") == 1
    out = reconstruct(tmp_path / "d", tmp_path / "m", base=toy_models["base"], progress=False)
    got, want = load_file(str(out / "model.safetensors")), load_file(str(ft / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        assert got[k].shape == (323, 256) and torch.equal(got[k][320:], want[k][320:])
    assert _load(out).config.vocab_size == 323


def test_tied_embeddings_stay_tied(toy_models, tmp_path):
    def untie(sd):
        sd.pop("lm_head.weight")
        return sd

    base = _variant(toy_models["base"], tmp_path / "b", untie, lambda c: c.update(tie_word_embeddings=True))
    ft = _variant(toy_models["upper"], tmp_path / "f", untie, lambda c: c.update(tie_word_embeddings=True))
    cfg = compress(base, ft, tmp_path / "d", OBS, progress=False)
    assert cfg.tie_word_embeddings and "lm_head.weight" not in cfg.tensors
    assert cfg.tensors["model.embed_tokens.weight"]["codec"] == "obs"  # with the lm_head's Hessian
    out = reconstruct(tmp_path / "d", tmp_path / "m", progress=False)
    assert "lm_head.weight" not in load_file(str(out / "model.safetensors"))
    model = _load(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_sharded_checkpoint_streams_like_a_single_file(toy_models, tmp_path):
    model = _load(toy_models["upper"])
    model.save_pretrained(str(tmp_path / "sharded"), max_shard_size="1MB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    one, many = Checkpoint(toy_models["upper"]), Checkpoint(tmp_path / "sharded")
    assert len(many.files) > 1 and sorted(one.names()) == sorted(many.names())
    for name in one.names():
        assert torch.equal(one.get(name), many.get(name))
    assert fingerprint(tmp_path / "sharded") == combine(
        (f, hashlib.sha256((tmp_path / "sharded" / f).read_bytes()).hexdigest()) for f in many.files)


def test_pickle_only_and_truncated_checkpoints_are_refused(toy_models, tmp_path):
    (tmp_path / "pkl").mkdir()
    torch.save({"w": torch.zeros(2)}, tmp_path / "pkl" / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="pickle"):
        Checkpoint(tmp_path / "pkl")
    (tmp_path / "cut").mkdir()
    data = (toy_models["base"] / "model.safetensors").read_bytes()
    (tmp_path / "cut" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelSourceError, match="truncated"):
        Checkpoint(tmp_path / "cut")


def test_fingerprint_uses_hf_cache_blob_names_and_its_cache(toy_models, tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path / "cache"))
    snap = tmp_path / "models--o--n" / "snapshots" / "abc"
    blobs = tmp_path / "models--o--n" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    fake = "ab" * 32  # the blob name is trusted as the file's sha256: nothing is read
    shutil.copyfile(toy_models["base"] / "model.safetensors", blobs / fake)
    (snap / "model.safetensors").symlink_to(blobs / fake)
    assert fingerprint(snap) == combine([("model.safetensors", fake)])
    real = fingerprint(toy_models["base"])
    assert (tmp_path / "cache" / "fingerprints.json").is_file()
    assert fingerprint(toy_models["base"]) == real and real.startswith("sha256:") and len(real) == 71


def test_layerwise_skeleton_reproduces_transformers(toy_models):
    """The calibration machinery (meta skeleton, recorders, one layer at a time) is exact."""
    from deltahub.layerwise import LayerwiseModel

    ckpt = Checkpoint(toy_models["upper"])
    skel = LayerwiseModel(toy_models["upper"])
    skel.load_outer(lambda n, p: p.copy_(ckpt.get(n)))
    ids = torch.randint(0, 300, (3, 40), generator=torch.Generator().manual_seed(0))
    hidden = skel.embed(ids, 2, torch.float32)
    for i in range(skel.n_layers):
        skel.load_layer(i, lambda n, p: p.copy_(ckpt.get(n)))
        skel.run_layer(i, hidden)
        skel.release_layer(i)
    h = skel.lm_head_hessian(hidden)
    model = _load(toy_models["upper"])
    with torch.no_grad():
        last = model.model(ids).last_hidden_state
    x = last.reshape(-1, 256)
    assert torch.allclose(h, 2 * x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_corrupt_truncated_and_unknown_version_deltas(obs_delta, toy_models, tmp_path):
    _, delta, _ = obs_delta
    bad = tmp_path / "bad"
    shutil.copytree(delta, bad)
    data = bytearray((bad / "delta.safetensors").read_bytes())
    data[-100] ^= 0xFF
    (bad / "delta.safetensors").write_bytes(bytes(data))
    with pytest.raises(DeltaFormatError, match=r"delta\.safetensors"):
        reconstruct(bad, tmp_path / "o1", base=toy_models["base"], progress=False)
    assert not (tmp_path / "o1").exists()  # nothing half-written left behind
    (bad / "delta.safetensors").write_bytes(bytes(data[: len(data) // 3]))
    with pytest.raises(DeltaFormatError, match=r"delta\.safetensors"):
        DeltaReader(bad).verify()
    shutil.copyfile(delta / "delta.safetensors", bad / "delta.safetensors")
    cfg = json.loads((bad / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (bad / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(DeltaFormatError, match="version 99"):
        reconstruct(bad, tmp_path / "o2", base=toy_models["base"], progress=False)


def test_mismatched_bases_are_refused(obs_delta, toy_models, tmp_path):
    _, delta, _ = obs_delta
    with pytest.raises(BaseMismatchError, match=r"made for base .*sha256:.*sha256:"):
        reconstruct(delta, tmp_path / "o", base=toy_models["pirate"], progress=False)

    def shrink(sd):
        cut = "mlp.down_proj.weight"
        return {k: v[:, :128].contiguous() if k.endswith(cut) else v for k, v in sd.items()}

    narrow = _variant(toy_models["base"], tmp_path / "narrow", shrink, lambda c: None)
    msg = r"down_proj\.weight: base \[256, 128\], fine-tune \[256, 512\]"
    with pytest.raises(ShapeMismatchError, match=msg):
        compress(narrow, toy_models["upper"], tmp_path / "d1", CompressConfig(method="rtn"), progress=False)
    other = _variant(toy_models["base"], tmp_path / "qwen", lambda sd: sd,
                     lambda c: c.update(architectures=["Qwen2ForCausalLM"], model_type="qwen2"))
    with pytest.raises(ShapeMismatchError, match="architecture mismatch"):
        compress(other, toy_models["upper"], tmp_path / "d2", CompressConfig(method="rtn"), progress=False)


def test_output_folder_must_be_empty_or_a_delta(toy_models, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(UsageError, match="not empty"):
        compress(toy_models["base"], toy_models["upper"], tmp_path / "busy", CompressConfig(method="rtn"),
                 progress=False)
    d = tmp_path / "d"
    compress(toy_models["base"], toy_models["upper"], d, CompressConfig(method="rtn"), progress=False)
    cfg = compress(toy_models["base"], toy_models["upper"], d, CompressConfig(method="rtn", bits=8),
                   progress=False)
    assert DeltaReader(d).config.compression == cfg.compression
    assert cfg.compression["groups"]["linear"]["bits"] == 8


def test_tensors_absent_from_the_delta_come_from_the_base(toy_models, tmp_path):
    def untie(sd):
        sd.pop("lm_head.weight")
        return sd

    ft = _variant(toy_models["upper"], tmp_path / "f", untie, lambda c: c.update(tie_word_embeddings=True))
    d = tmp_path / "d"
    compress(toy_models["base"], ft, d, CompressConfig(method="rtn"), progress=False)  # base unties
    cfg = json.loads((d / CONFIG_NAME).read_text())
    norm = "model.norm.weight"
    del cfg["tensors"][norm], cfg["storage"][f"{norm}.delta"]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    out = reconstruct(d, tmp_path / "m", base=toy_models["base"], progress=False)
    got = load_file(str(out / "model.safetensors"))
    assert "lm_head.weight" not in got  # the fine-tune ties it
    assert torch.equal(got[norm], load_file(str(toy_models["base"] / "model.safetensors"))[norm])

"""Acceptance (issue 2): the CLI's happy paths, and clear one-line errors (library and CLI) for
corrupt / truncated / unknown-version deltas, shape-mismatched bases and unknown option values."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from deltahub.cli.main import main
from deltahub.compress import CompressConfig, compress
from deltahub.errors import BaseMismatchError, DeltaFormatError, ShapeMismatchError
from deltahub.reconstruct import reconstruct
from deltahub.store import CONFIG_NAME, DeltaReader

LAYER = "model.layers.0.mlp.gate_proj.weight"


def _cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def _one_error_line(code: int, err: str) -> str:
    """Non-zero exit, exactly one stderr line starting with 'error:' (the last), no traceback."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert code != 0
    assert "Traceback" not in err
    assert sum(ln.startswith("error:") for ln in lines) == 1 and lines[-1].startswith("error:"), err
    return lines[-1]


@pytest.fixture(scope="module")
def delta(toy_models, tmp_path_factory) -> Path:
    """A valid rtn 4-bit 2:4 delta of the 'upper' fine-tune (not to be modified)."""
    out = tmp_path_factory.mktemp("cli") / "delta"
    compress(toy_models["base"], toy_models["upper"], out, CompressConfig(method="rtn"), progress=False)
    return out


@pytest.fixture(scope="module")
def bad_base(toy_models, tmp_path_factory) -> Path:
    """The toy base with one matrix of the wrong shape (gate_proj cut to half its rows)."""
    from safetensors.torch import load_file, save_file

    out = tmp_path_factory.mktemp("badbase") / "base"
    shutil.copytree(toy_models["base"], out)
    weights = load_file(str(out / "model.safetensors"))
    weights[LAYER] = weights[LAYER][: weights[LAYER].shape[0] // 2].clone()
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


# ---------------------------------------------------------------------------------- happy paths


def test_cli_compress_reconstruct_inspect(toy_models, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from deltahub.fingerprint import fingerprint

    calib = tmp_path / "calib.jsonl"
    lines = (json.dumps({"text": f"Some calibration sentence number {i}."}) for i in range(40))
    calib.write_text("\n".join(lines))
    d = tmp_path / "delta"
    code, out, err = _cli(capsys, ["compress", "--base", toy_models["base"],
                                   "--finetuned", toy_models["pirate"], "--output", d,
                                   "--method", "obs", "--bits", "3", "--sparsity", "2:4",
                                   "--group-size", "64", "--calibration-samples", "4", "--seq-len", "32",
                                   "--calibration-data", calib, "--lossless", "zstd", "--device", "cpu"])
    assert code == 0, err
    assert "smaller than the fine-tune in bf16" in out
    DeltaReader(d).verify()

    code, out, err = _cli(capsys, ["inspect", d, "--json"])
    assert code == 0, err
    info = json.loads(out)
    assert info["method"] == "obs" and info["lossless"] == "zstd"
    assert info["base_model"]["fingerprint"] == fingerprint(toy_models["base"])
    assert info["calibration"] == {"data": str(calib), "samples": 4, "seq_len": 32}
    lin = info["groups"]["linear"]
    assert (lin["codec"], lin["bits"], lin["sparsity"], lin["group_size"]) == ("obs", 3, "2:4", 64)
    assert lin["options"]["mask"] == "random"  # obs's mask="auto" as resolved at 3 bits
    assert {"linear", "embedding", "lm_head", "other"} <= set(info["groups"])
    for g in info["groups"].values():
        assert 0 < g["stored_bytes"] <= g["raw_bytes"]
    ratio = info["finetuned_bf16_bytes"] / info["payload_bytes"]
    assert info["ratio_vs_bf16"] == pytest.approx(ratio, rel=1e-3)
    code, out, err = _cli(capsys, ["inspect", d])
    assert code == 0 and "linear" in out and "fingerprint sha256:" in out and "ratio" in out
    assert "mask random" in out

    m = tmp_path / "model"
    code, out, err = _cli(capsys, ["reconstruct", d, "--base", toy_models["base"], "--output", m])
    assert code == 0, err
    model = AutoModelForCausalLM.from_pretrained(str(m), dtype=torch.float32)
    assert model.config.hidden_size == 256 and (m / "tokenizer.json").is_file()


def test_cli_rtn_8bit_dense_without_lossless(toy_models, tmp_path, capsys):
    d = tmp_path / "delta"
    code, _, err = _cli(capsys, ["compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                                 "--output", d, "--method", "rtn", "--bits", "8", "--sparsity", "none",
                                 "--lossless", "none"])
    assert code == 0, err
    storage = DeltaReader(d).config.storage
    assert {s["encoding"] for s in storage.values()} == {"raw"}
    code, out, _ = _cli(capsys, ["inspect", d, "--json"])
    lin = json.loads(out)["groups"]["linear"]
    assert (lin["codec"], lin["bits"], lin["sparsity"]) == ("rtn", 8, "none")


@pytest.mark.parametrize(("flag", "value", "needle"), [
    ("--method", "zip", "zip"), ("--bits", "5", "bits"), ("--sparsity", "1:2", "sparsity"),
    ("--group-size", "48", "group size"), ("--lossless", "gzip", "gzip"), ("--device", "tpu", "tpu"),
])
def test_cli_rejects_unknown_option_values(toy_models, tmp_path, capsys, flag, value, needle):
    out = tmp_path / "delta"
    code, _, err = _cli(capsys, ["compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                                 "--output", out, "--method", "rtn", flag, value])
    assert needle in _one_error_line(code, err)
    assert not out.exists()


# --------------------------------------------------------------------------------- broken deltas


def _truncate(d: Path) -> str:
    f = d / "delta.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return "delta.safetensors"


def _corrupt(d: Path) -> str:
    f = d / "delta.safetensors"
    data = bytearray(f.read_bytes())
    for i in range(len(data) - 4000, len(data), 97):  # inside the tensor data, past the header
        data[i] ^= 0xFF
    f.write_bytes(bytes(data))
    return "delta.safetensors"


def _future_version(d: Path) -> str:
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["format_version"] = 99
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    return CONFIG_NAME


def _no_config(d: Path) -> str:
    (d / CONFIG_NAME).unlink()
    return CONFIG_NAME


BREAKS = {"truncated": _truncate, "corrupted": _corrupt, "unknown-version": _future_version,
          "no-config": _no_config}


@pytest.mark.parametrize("how", sorted(BREAKS))
def test_broken_delta_library_and_cli(delta, toy_models, tmp_path, capsys, monkeypatch, how):
    d = tmp_path / "delta"
    shutil.copytree(delta, d)
    fname = BREAKS[how](d)
    out = tmp_path / "model"
    with pytest.raises(DeltaFormatError, match=fname.replace(".", r"\.")):
        DeltaReader(d).verify()
    with pytest.raises(DeltaFormatError, match=fname.replace(".", r"\.")):
        reconstruct(d, out, base=toy_models["base"], progress=False)
    assert not out.exists()  # nothing half-written is left behind

    argv = ["reconstruct", d, "--base", toy_models["base"], "--output", out]
    line = _one_error_line(*_cli(capsys, argv)[::2])
    assert fname in line
    if how in ("unknown-version", "no-config"):
        assert fname in _one_error_line(*_cli(capsys, ["inspect", d, "--json"])[::2])
    if how == "unknown-version":
        assert "99" in line

    monkeypatch.setenv("DELTAHUB_DEBUG", "1")
    code, _, err = _cli(capsys, argv)
    assert code != 0 and "Traceback" in err and "DeltaFormatError" in err


# ----------------------------------------------------------------------------- mismatched bases


def test_shape_mismatched_base_on_compress(toy_models, bad_base, tmp_path, capsys):
    with pytest.raises(ShapeMismatchError, match=LAYER):
        compress(bad_base, toy_models["upper"], tmp_path / "a", CompressConfig(method="rtn"), progress=False)
    code, _, err = _cli(capsys, ["compress", "--base", bad_base, "--finetuned", toy_models["upper"],
                                 "--output", tmp_path / "b", "--method", "rtn"])
    assert LAYER in _one_error_line(code, err)


def test_shape_mismatched_base_on_reconstruct(delta, bad_base, tmp_path, capsys):
    # the recorded fingerprint catches any other base first ...
    with pytest.raises(BaseMismatchError, match="different weights"):
        reconstruct(delta, tmp_path / "a", base=bad_base, progress=False)
    code, _, err = _cli(capsys, ["reconstruct", delta, "--base", bad_base, "--output", tmp_path / "b"])
    assert "different weights" in _one_error_line(code, err)
    # ... and without one, the shape check names the tensor
    d = tmp_path / "delta"
    shutil.copytree(delta, d)
    cfg = json.loads((d / CONFIG_NAME).read_text())
    cfg["base_model"]["fingerprint"] = None
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    with pytest.raises(ShapeMismatchError, match=LAYER):
        reconstruct(d, tmp_path / "c", base=bad_base, progress=False)
    code, _, err = _cli(capsys, ["reconstruct", d, "--base", bad_base, "--output", tmp_path / "e"])
    assert LAYER in _one_error_line(code, err)
    assert not (tmp_path / "e").exists()

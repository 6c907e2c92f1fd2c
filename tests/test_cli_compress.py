"""``deltahub compress|reconstruct|inspect`` run in-process: exit codes, output, one-line errors."""

from __future__ import annotations

import json

import pytest

from deltahub.cli.main import main


def _run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def cli_delta(toy_models, tmp_path_factory):
    d = tmp_path_factory.mktemp("cli") / "delta"
    assert main(["compress", "--base", str(toy_models["base"]), "--finetuned", str(toy_models["upper"]),
                 "--output", str(d), "--method", "rtn", "--bits", "4", "--sparsity", "2:4",
                 "--group-size", "128", "--lossless", "zstd"]) == 0
    return d


def test_compress_obs_prints_summary(toy_models, tmp_path, capsys):
    code, out, _ = _run(capsys, "compress", "--base", toy_models["base"],
                        "--finetuned", toy_models["reverse"], "--output", tmp_path / "d",
                        "--bits", "2", "--calibration-samples", "4", "--seq-len", "64", "--device", "cpu",
                        "--lossless", "none")
    assert code == 0 and "payload" in out and "smaller than the fine-tune in bf16" in out
    code, out, _ = _run(capsys, "inspect", tmp_path / "d", "--json")
    info = json.loads(out)
    assert info["method"] == "obs" and info["lossless"] == "none"
    assert info["groups"]["linear"]["bits"] == 2 and info["calibration"]["samples"] == 4
    assert info["payload_bytes"] == info["packed_bytes"]  # no lossless stage


def test_vocab_matrices_get_their_own_settings(toy_models, tmp_path, capsys):
    """--vocab-bits/--vocab-sparsity: embedding and lm_head at 8-bit dense, the linears at the
    main settings; the delta reconstructs and records both groups' settings."""
    code, _, _ = _run(capsys, "compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                      "--output", tmp_path / "d", "--bits", "2", "--vocab-bits", "8",
                      "--vocab-sparsity", "none", "--calibration-samples", "4", "--seq-len", "64")
    assert code == 0
    cfg = json.loads((tmp_path / "d" / "delta_config.json").read_text())
    tensors = cfg["tensors"]
    layouts = {n: (t["layout"]["bits"], t["layout"]["sparsity"]) for n, t in tensors.items()
               if t.get("layout")}
    emb, head = "model.embed_tokens.weight", "lm_head.weight"
    assert layouts.pop(emb) == (8, "none") and layouts.pop(head) == (8, "none")
    assert set(layouts.values()) == {(2, "2:4")}
    assert tensors[head]["codec"] == "obs" and tensors[emb]["codec"] == "rtn"
    g = cfg["compression"]["groups"]
    assert (g["embedding"]["bits"], g["lm_head"]["sparsity"], g["linear"]["bits"]) == (8, "none", 2)
    assert (g["linear"]["mask"], g["lm_head"]["mask"]) == ("obs", None)  # auto: 2 bits saliency; dense
    code, _, _ = _run(capsys, "reconstruct", tmp_path / "d", "--base", toy_models["base"],
                      "--output", tmp_path / "m")
    assert code == 0


def test_codec_options_reach_the_codec(toy_models, tmp_path, capsys):
    code, _, _ = _run(capsys, "compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                      "--output", tmp_path / "d", "--codec-option", "mask=random", "--codec-option",
                      "act_order=false", "--codec-option", "damp=0.05", "--calibration-samples", "4",
                      "--seq-len", "64")
    assert code == 0
    linear = json.loads((tmp_path / "d" / "delta_config.json").read_text())["compression"]["groups"]["linear"]
    assert (linear["mask"], linear["act_order"], linear["damp"]) == ("random", False, 0.05)
    code, out, _ = _run(capsys, "inspect", tmp_path / "d")
    assert code == 0 and "linear options" in out and "mask random" in out


def test_inspect_and_card_read_deltas_of_the_saliency_default(toy_models, tmp_path, capsys):
    """Deltas written while obs's default mask was "obs" record it for every layout (or, older,
    nothing): inspect and the model card show what is recorded, and the delta still reconstructs."""
    from deltahub.modelcard import render
    from deltahub.store import DeltaReader

    code, _, _ = _run(capsys, "compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                      "--output", tmp_path / "d", "--calibration-samples", "4", "--seq-len", "64")
    assert code == 0
    path = tmp_path / "d" / "delta_config.json"
    cfg = json.loads(path.read_text())
    assert cfg["compression"]["groups"]["linear"]["mask"] == "random"  # 4-bit 2:4 today
    for old in ("obs", None):
        for group in ("linear", "lm_head"):
            if old is None:
                del cfg["compression"]["groups"][group]["mask"]
            else:
                cfg["compression"]["groups"][group]["mask"] = old
        path.write_text(json.dumps(cfg))
        code, out, _ = _run(capsys, "inspect", tmp_path / "d", "--json")
        assert code == 0
        options = json.loads(out)["groups"]["linear"]["options"]
        assert options.get("mask") == old and options["damp"] == 0.01
        card = render(DeltaReader(tmp_path / "d").config, tmp_path / "d", repo_id="org/upper-delta")
        settings = next(line for line in card.splitlines() if line.startswith("| linear tensors |"))
        assert ("mask obs" in settings) == (old == "obs") and "mask random" not in settings
    code, _, _ = _run(capsys, "reconstruct", tmp_path / "d", "--base", toy_models["base"],
                      "--output", tmp_path / "m")
    assert code == 0


def test_inspect_table_and_json(cli_delta, capsys):
    code, out, _ = _run(capsys, "inspect", cli_delta)
    assert code == 0
    for word in ("fingerprint sha256:", "linear", "embedding", "lm_head", "other", "ratio", "rtn", "2:4"):
        assert word in out
    code, out, _ = _run(capsys, "inspect", cli_delta, "--json")
    info = json.loads(out)
    assert info["groups"]["linear"]["group_size"] == 128
    ratio = info["finetuned_bf16_bytes"] / info["payload_bytes"]
    assert info["ratio_vs_bf16"] == pytest.approx(ratio, rel=1e-3)
    assert info["base_model"]["fingerprint"].startswith("sha256:")


def test_reconstruct_cli(cli_delta, toy_models, tmp_path, capsys):
    code, out, _ = _run(capsys, "reconstruct", cli_delta, "--base", toy_models["base"],
                        "--output", tmp_path / "m")
    assert code == 0 and (tmp_path / "m" / "model.safetensors").is_file() and "wrote" in out


@pytest.mark.parametrize("args, match", [
    (["--method", "gptq"], "unknown compression method 'gptq'; known:"),
    (["--bits", "5"], "bits must be one of"),
    (["--sparsity", "1:2"], "sparsity must be one of"),
    (["--group-size", "48"], "group size"),
    (["--lossless", "lz4"], "lossless stage"),
    (["--vocab-sparsity", "1:2"], "sparsity must be one of"),
    (["--codec-option", "mask"], "KEY=VALUE"),
    (["--codec-option", "colour=red"], "has no option(s) ['colour']"),
    (["--codec-option", "mask=magnitude"], "mask must be"),
    (["--codec-option", "damp=0.1", "--codec-option", "damp=0.2"], "given twice"),
    (["--device", "tpu"], "device"),
    (["--calibration-samples", "0"], "positive"),
    (["--calibration-data", "/nonexistent/calib.txt"], "calibration data"),
])
def test_compress_bad_options_one_line(toy_models, tmp_path, capsys, args, match):
    code, _, err = _run(capsys, "compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                        "--output", tmp_path / "d", *args)
    assert code == 1 and err.count("\n") == 1 and err.startswith("error: ") and match in err


def test_compress_errors_one_line(toy_models, tmp_path, capsys):
    code, _, err = _run(capsys, "compress", "--base", tmp_path / "missing",
                        "--finetuned", toy_models["upper"], "--output", tmp_path / "d")
    assert code == 1 and err.count("\n") == 1 and "missing" in err
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text("{}")
    code, _, err = _run(capsys, "compress", "--base", tmp_path / "cfg", "--finetuned", toy_models["upper"],
                        "--output", tmp_path / "d")
    assert code == 1 and err.count("\n") == 1 and "no model weights" in err


def test_reconstruct_and_inspect_errors_one_line(cli_delta, toy_models, tmp_path, capsys):
    code, _, err = _run(capsys, "inspect", toy_models["base"])
    assert code == 1 and err.count("\n") == 1 and "delta_config.json" in err
    code, _, err = _run(capsys, "reconstruct", cli_delta, "--base", toy_models["pirate"],
                        "--output", tmp_path / "m")
    assert code == 1 and err.count("\n") == 1 and "made for base" in err
    code, _, err = _run(capsys, "reconstruct", cli_delta, "--base", toy_models["base"], "--output", cli_delta)
    assert code == 1 and "input folders" in err


def test_debug_shows_traceback(toy_models, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DELTAHUB_DEBUG", "1")
    code, _, err = _run(capsys, "compress", "--base", toy_models["base"], "--finetuned", toy_models["upper"],
                        "--output", tmp_path / "d", "--bits", "5")
    assert code == 1 and "Traceback" in err

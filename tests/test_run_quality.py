"""benchmarks/quality/run_quality.py on the CPU, without running it: its setting tables and the
merge of a new run's rows into an earlier results file (``--merge-into``)."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "quality" / "run_quality.py"


@pytest.fixture(scope="module")
def rq():
    spec = importlib.util.spec_from_file_location("run_quality", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(ft: str, label: str, ppl: float, **extra) -> dict:
    return {
        "finetune": ft,
        "codec": label,
        "payload_bytes": 4e7,
        "ratio": 6.5,
        "ppl_domain_original": 10.0,
        "ppl_domain": ppl,
        "rel_increase": ppl / 10.0 - 1,
        "ppl_general": 40.0,
        "ppl_domain_exact_embedding": None,
        **extra,
    }


def _result(rows: list[dict], date: str, command: str, **extra) -> dict:
    fts = [
        {"domain": d, "steps": 150, "batch": 16, "seq_len": 512, "ppl_domain": 10.0, "ppl_general": 40.0}
        for d in ("bible", "dictionary")
    ]
    return {
        "device": "NVIDIA H200",
        "date": date,
        "command": command,
        "versions": {},
        "settings": {},
        "finetunes": fts,
        "rows": rows,
        "errors": [],
        "complete": True,
        "not_run": [],
        **extra,
    }


@pytest.fixture
def old_new():
    old = _result(
        [
            _row("bible", "obs 4-bit 2:4", 10.07),
            _row("bible", "obs 2-bit 2:4", 10.15),
            _row("dictionary", "obs 4-bit 2:4", 10.09),
            _row("dictionary", "bitdelta", 11.0),
        ],
        "2026-11-28",
        "run_quality.py --out A",
    )
    new = _result(
        [
            _row("bible", "obs 4-bit 2:4", 10.02, mask="random", run="2026-12-01T10:00:00Z"),
            _row("bible", "obs 1-bit dense damp 100 + scale distillation", 10.2, run="2026-12-01T10:00:00Z"),
        ],
        "2026-12-01",
        "run_quality.py --out B --settings ...",
        run="2026-12-01T10:00:00Z",
        complete=False,
        not_run=["dictionary: obs 4-bit 2:4"],
    )
    return old, new


def test_merge_replaces_what_the_run_measured_and_keeps_the_rest(rq, old_new):
    old, new = old_new
    before = copy.deepcopy(old)
    merged = rq.merge_results(old, new)
    assert old == before  # the earlier file's dict is not modified
    got = {(r["finetune"], r["codec"]): r for r in merged["rows"]}
    assert len(merged["rows"]) == len(got) == 5
    assert got["bible", "obs 4-bit 2:4"]["ppl_domain"] == 10.02  # replaced
    assert got["bible", "obs 4-bit 2:4"]["run"] == "2026-12-01T10:00:00Z"
    assert got["bible", "obs 4-bit 2:4"]["mask"] == "random"
    assert got["bible", "obs 1-bit dense damp 100 + scale distillation"]["run"] == "2026-12-01T10:00:00Z"
    # not measured by the new run (dictionary's 4-bit was cut by the deadline): kept, untagged
    assert got["dictionary", "obs 4-bit 2:4"] == old["rows"][2] and "run" not in got["dictionary", "bitdelta"]
    assert got["bible", "obs 2-bit 2:4"] == old["rows"][1]
    # the file's own run stays at the top; the merged run is recorded
    assert (merged["date"], merged["command"], merged["finetunes"]) == (
        old["date"],
        old["command"],
        old["finetunes"],
    )
    (entry,) = merged["merged_runs"]
    assert entry["run"] == "2026-12-01T10:00:00Z" and entry["date"] == "2026-12-01"
    assert entry["command"] == new["command"] and entry["complete"] is False
    assert entry["not_run"] == ["dictionary: obs 4-bit 2:4"]
    assert entry["replaced"] == [["bible", "obs 4-bit 2:4"]]
    assert entry["added"] == [["bible", "obs 1-bit dense damp 100 + scale distillation"]]
    assert entry["labels"] == ["obs 1-bit dense damp 100 + scale distillation", "obs 4-bit 2:4"]
    # rows in the script's order: by fine-tune, then SETTINGS + ABLATIONS order
    labels = [s[0] for s in rq.SETTINGS + rq.ABLATIONS]
    order = [(r["finetune"], labels.index(r["codec"])) for r in merged["rows"]]
    assert order == sorted(order, key=lambda x: (["bible", "dictionary"].index(x[0]), x[1]))
    assert "Merged run 2026-12-01T10:00:00Z (2 rows, 1 replaced)" in rq.markdown(merged)


def test_merge_again_is_idempotent_and_later_runs_stack(rq, old_new):
    old, new = old_new
    once = rq.merge_results(old, new)
    assert rq.merge_results(once, new) == once
    later = _result(
        [_row("dictionary", "obs 4-bit 2:4", 10.03)],
        "2026-12-02",
        "run_quality.py --out C",
        run="2026-12-02T09:00:00Z",
    )
    twice = rq.merge_results(once, later)
    assert [e["run"] for e in twice["merged_runs"]] == ["2026-12-01T10:00:00Z", "2026-12-02T09:00:00Z"]
    got = {(r["finetune"], r["codec"]): r for r in twice["rows"]}
    assert got["dictionary", "obs 4-bit 2:4"]["run"] == "2026-12-02T09:00:00Z"
    assert got["bible", "obs 4-bit 2:4"]["run"] == "2026-12-01T10:00:00Z"
    # a run that recorded no id (older files) is known by its date
    dated = rq.merge_results(old, {**later, "run": None})
    assert dated["merged_runs"][0]["run"] == "2026-12-02"


def test_merge_into_cli_writes_out_merged_and_leaves_the_file(rq, old_new, tmp_path, monkeypatch):
    """``--render RUN.json --merge-into FILE --out DIR``: DIR/merged/ gets FILE's names."""
    old, new = old_new
    target, run = tmp_path / "quality_x.json", tmp_path / "run.json"
    target.write_text(json.dumps(old))
    run.write_text(json.dumps(new))
    monkeypatch.setattr(rq, "plot", lambda result, path: path.write_text("png"))
    monkeypatch.setattr(
        sys,
        "argv",
        ["run_quality.py", "--render", str(run), "--merge-into", str(target), "--out", str(tmp_path / "out")],
    )
    rq.main()
    merged = tmp_path / "out" / "merged"
    assert sorted(p.name for p in merged.iterdir()) == [
        "quality_x.json",
        "quality_x.png",
        "quality_x_table.md",
    ]
    assert json.loads((merged / "quality_x.json").read_text()) == rq.merge_results(old, new)
    assert json.loads(target.read_text()) == old
    monkeypatch.setattr(sys, "argv", ["run_quality.py", "--merge-into", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match="not a file"):
        rq.main()


def test_settings_follow_the_obs_default_and_ablations_pin_the_mask(rq):
    """SETTINGS' obs rows leave ``mask`` to the default (mask="auto"); the rows measured with
    the saliency mask before that default, and the random-mask rows, keep their meaning."""
    table = {s[0]: s for s in rq.SETTINGS + rq.ABLATIONS}
    assert len(table) == len(rq.SETTINGS) + len(rq.ABLATIONS)
    settings = {s[0] for s in rq.SETTINGS}
    for label in ("obs 4-bit 2:4", "obs 3-bit 2:4", "obs 4-bit 2:4 + scale distillation"):
        assert label in settings and "mask" not in table[label][4]
    assert not {"obs 4-bit 2:4 random mask", "obs 4-bit 2:4 random mask + scale distillation"} & settings
    expected = {
        "obs 4-bit 2:4 saliency mask": (4, {"mask": "obs"}),
        "obs 4-bit 2:4 saliency mask + scale distillation": (4, {"mask": "obs", "distill": True}),
        "obs 3-bit 2:4 saliency mask": (3, {"mask": "obs"}),
        "obs 4-bit 2:4 random mask": (4, {"mask": "random"}),
        "obs 4-bit 2:4 random mask + scale distillation": (4, {"mask": "random", "distill": True}),
        "obs 1-bit dense damp 100 + scale distillation": (1, {"damp": 100.0, "distill": True}),
    }
    for label, (bits, options) in expected.items():
        assert label not in settings and (table[label][2], table[label][4]) == (bits, options), label
    for label, method, bits, sparsity, options in rq.ABLATIONS:  # older 4-bit ablations: saliency
        if method == "obs" and bits == 4 and sparsity == "2:4" and "random" not in label:
            assert options.get("mask") == "obs", label

"""The GPU pipeline compresses linears that read one input (q/k/v, gate/up: one shared Hessian) as
one row-concatenated matrix and splits the result by rows. Forced here on the CPU: the delta must
match compressing them one by one."""

from __future__ import annotations

import torch

import deltahub.compress as dc
from deltahub.compress import CompressConfig, compress
from deltahub.store import DeltaReader

# the saliency mask: a random mask (the 4-bit default) is drawn per compress call, so stacking
# q/k/v changes its draws (not its distribution) and the two runs could not be compared
CFG = CompressConfig(method="obs", bits=4, sparsity="2:4", calibration_samples=8, seq_len=64,
                     options={"mask": "obs"})


def test_shared_input_groups_on_gpu_only():
    class Plan:
        group = {n: "linear" for n in "qkvog"} | {"norm": "other"}

    h1, h2 = torch.eye(2), torch.eye(2)
    hs = {"q": h1, "k": h1, "v": h1, "o": h2, "g": torch.eye(2)}
    codec = dc.get_codec("obs")()
    names = ["norm", "q", "k", "v", "o", "g"]
    assert dc._shared_input_groups(names, Plan(), hs, codec, torch.device("cpu")) == [[n] for n in names]
    assert dc._shared_input_groups(names, Plan(), hs, codec, torch.device("cuda")) == [
        ["norm"], ["q", "k", "v"], ["o"], ["g"]]
    lowrank = dc.get_codec("lowrank")()  # not row-separable: never concatenated
    assert dc._shared_input_groups(names, Plan(), hs, lowrank, torch.device("cuda")) == [[n] for n in names]


def test_concatenated_compression_matches_one_by_one(toy_models, tmp_path, monkeypatch):
    alone = compress(toy_models["base"], toy_models["upper"], tmp_path / "alone", CFG, progress=False)
    real, seen = dc._shared_input_groups, []

    def forced(names, plan, hessians, codec, device):
        groups = real(names, plan, hessians, codec, torch.device("cuda"))
        seen.extend(g for g in groups if len(g) > 1)
        return groups

    monkeypatch.setattr(dc, "_shared_input_groups", forced)
    together = compress(toy_models["base"], toy_models["upper"], tmp_path / "together", CFG, progress=False)
    short = sorted(tuple(sorted(n.split(".")[-2] for n in g)) for g in seen)
    assert short == [("gate_proj", "up_proj")] * 2 + [("k_proj", "q_proj", "v_proj")] * 2
    ra, rt = DeltaReader(tmp_path / "alone"), DeltaReader(tmp_path / "together")
    assert sorted(ra.names()) == sorted(rt.names())
    for name in ra.names():
        a, t = ra.read(name), rt.read(name)
        assert a.shape == t.shape and a.parts.keys() == t.parts.keys(), name
        for part in a.parts:
            same = (a.parts[part] == t.parts[part]).float().mean()
            assert same >= 0.99, (name, part, float(same))
    assert together.stats["payload_bytes"] == alone.stats["payload_bytes"] or abs(
        together.stats["payload_bytes"] / alone.stats["payload_bytes"] - 1) < 0.01

"""Scale distillation: tune the scales of a finished delta against the fine-tune's logits.

The codes, 2:4 positions and everything else stay as stored; only the ``scales`` of ``qlinear``
tensors change. Each trainable tensor gets log-factors f (Adam) and is applied as

    W = W_base + unit(Δ̂) · (scales · exp(f))     unit(Δ̂) = the tensor dequantized with unit scales

so that the student (base + delta) matches the fine-tune's next-token distribution (KL divergence)
on calibration text. Granularity: one factor per matrix for ``bitdelta`` (its rows share α, as in
BitDelta), one per stored scale (row, group) for every other qlinear codec — this is what lets a
layer-wise codec such as ``obs`` correct the end-to-end drift that per-layer objectives cannot see
(e.g. the mass 2:4 pruning removes). Tensors with added rows (``extra_rows``) are left as they are.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from deltahub import format as fmt


def _rewrite(folder: Path, packed: dict[str, fmt.PackedTensor], groups: dict[str, str], config) -> None:
    """Write ``packed`` back into the delta ``folder`` (same lossless stage), replacing its shards."""
    from deltahub.store import DeltaWriter

    old = {rec["file"] for rec in config.storage.values()}
    lossless = config.compression.get("lossless") or (
        "zstd" if any(r.get("encoding") == "zstd" for r in config.storage.values()) else "none"
    )
    writer = DeltaWriter(folder, lossless_codec=lossless)
    for name, p in packed.items():
        writer.add(name, p, group=groups[name])
    stored = sum(r["stored_bytes"] for r in writer.storage.values())
    if "payload_bytes" in config.stats:  # keep the recorded sizes true
        config.stats["payload_bytes"] = stored
        if config.stats.get("finetuned_bf16_bytes"):
            config.stats["ratio_vs_bf16"] = round(config.stats["finetuned_bf16_bytes"] / max(stored, 1), 3)
    new = writer.finish(config)
    for fname in old - {rec["file"] for rec in new.storage.values()}:
        (folder / fname).unlink(missing_ok=True)


class _Scaled:
    """One trainable tensor: unit values [N, K] (bf16) on the device, base scales [N, G] (fp32),
    the scale group of every column (None: one scale per row)."""

    def __init__(self, p: fmt.PackedTensor, per_matrix: bool, device: torch.device) -> None:
        assert p.layout is not None
        k = p.shape[1]
        unit = fmt.PackedTensor(p.kind, p.shape, {**p.parts, "scales": torch.ones_like(p.parts["scales"])},
                                codec=p.codec, layout=p.layout)
        # codes minus the zero point are half-integers of <= 8 significant bits: exact in bf16
        self.unit = fmt.dequantize(unit).to(device, torch.bfloat16)
        self.scales = p.parts["scales"].to(device, torch.float32)
        gs = p.layout.group_size
        cols = torch.arange(k, device=device)
        self.gidx = None if gs is None else (cols // gs).clamp_(max=self.scales.shape[1] - 1)
        self.shape = (1,) if per_matrix else tuple(self.scales.shape)

    def delta(self, f: torch.Tensor) -> torch.Tensor:
        s = self.scales * f.exp()  # [N, G] (f broadcasts from [1] or [N, G])
        return self.unit * (s if self.gidx is None else s[:, self.gidx])

    def new_scales(self, f: torch.Tensor) -> torch.Tensor:
        return (self.scales * f.exp()).cpu()


def distill_scales(
    delta: str | os.PathLike,
    *,
    base: str | os.PathLike,
    finetuned: str | os.PathLike,
    calibration_data: str | os.PathLike | None = None,
    samples: int = 64,
    seq_len: int = 256,
    steps: int = 100,
    batch_size: int = 4,
    lr: float | None = None,
    per_matrix: bool = True,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Train the scales of every qlinear tensor of the delta folder ``delta`` against the
    fine-tune's logits and rewrite the folder in place. ``base``/``finetuned``: model folders.

    ``per_matrix``: one factor per matrix (default; better than one per row for every codec
    measured, 1 and 2 bits: docs/benchmarks/README.md run 8) or one per stored scale (False).
    ``lr`` defaults to 0.02 with one factor per matrix, else 0.005. Returns {"steps", "kl_first",
    "kl_last", "tensors", "factors", ...};
    the same record lands in delta_config.json under compression["distill"].
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltahub.calibration import calibration_ids
    from deltahub.store import DeltaReader

    folder = Path(delta)
    reader = DeltaReader(folder)
    config = reader.config
    packed = {name: reader.read(name) for name in reader.names()}
    groups = {name: config.tensors[name]["group"] for name in packed}
    del reader
    train = [n for n, p in packed.items() if p.kind == "qlinear" and "extra_rows" not in p.parts]
    if not train:
        return {"steps": 0, "tensors": 0}
    if lr is None:
        lr = 0.02 if per_matrix else 0.005

    dev = torch.device(device)
    student = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(dev).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).to(dev).eval()
    for m in (student, teacher):
        m.requires_grad_(False)
    params = dict(student.named_parameters(remove_duplicate=False))
    with torch.no_grad():  # the rest of the delta (norms, other kinds) is applied as stored
        for name, p in packed.items():
            if name not in train and name in params and "extra_rows" not in p.parts:
                params[name].add_(fmt.dequantize(p).reshape(params[name].shape).to(dev))
    tensors = {n: _Scaled(packed[n], per_matrix, dev) for n in train}
    factors = {n: torch.zeros(t.shape, device=dev, requires_grad=True) for n, t in tensors.items()}
    opt = torch.optim.Adam(list(factors.values()), lr=lr)

    has_tok = (folder / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(folder) if has_tok else str(finetuned))
    ids = calibration_ids(tok, samples, seq_len, calibration_data, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kls: list[float] = []
    for _ in range(steps):
        batch = ids[torch.randint(0, ids.shape[0], (batch_size,), generator=g)].to(dev)
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)
        weights = {n: params[n] + t.delta(factors[n]).reshape(params[n].shape) for n, t in tensors.items()}
        logits = torch.func.functional_call(student, weights, args=(), kwargs={"input_ids": batch}).logits
        logp = torch.log_softmax(logits.float(), -1)
        kl = torch.nn.functional.kl_div(logp.flatten(0, 1), target.flatten(0, 1), log_target=True,
                                        reduction="batchmean")
        opt.zero_grad()
        kl.backward()
        opt.step()
        kls.append(float(kl.detach()))
    if any(math.isnan(k) for k in kls):
        raise FloatingPointError("scale distillation diverged (NaN loss); lower lr")

    all_f = torch.cat([f.detach().flatten() for f in factors.values()]).exp()
    for n, t in tensors.items():
        old = packed[n].parts["scales"]
        packed[n].parts["scales"] = t.new_scales(factors[n].detach()).expand_as(old).clone()
    record = {
        "steps": steps,
        "lr": lr,
        "per_matrix": per_matrix,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "samples": samples,
        "tensors": len(train),
        "factors": int(all_f.numel()),
        "kl_first": kls[0],
        "kl_last": kls[-1],
        "scale_factor_range": [float(all_f.min()), float(all_f.max())],
    }
    config.compression = {**config.compression, "distill": record}
    _rewrite(folder, packed, groups, config)
    return record

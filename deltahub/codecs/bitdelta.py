"""``bitdelta``: sign of the delta times one scale per matrix (BitDelta, Liu et al. 2024).

Stored as a dense 1-bit ``qlinear`` with one scale per output row, all rows holding the same
value: code 1 -> +α, code 0 -> -α (the format's mid-rise grid with scale 2α). α = mean |Δ|
minimises ||Δ - α sign(Δ)||². Settings ``bits``/``sparsity``/``group_size`` are ignored.

Optional scale distillation (:func:`distill_scales`, run after compression on a finished delta
folder): the per-matrix α are trained (in log space, Adam) so that base + α·sign(Δ) matches the
fine-tune's next-token distribution (KL divergence) on calibration text; the signs stay fixed.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch

from deltahub import format as fmt
from deltahub.codecs.base import Codec, pad_columns

LAYOUT = fmt.QuantLayout(bits=1, sparsity="none", group_size=None)


class BitDeltaCodec(Codec):
    """sign(Δ) x α with α = mean|Δ| per matrix (no calibration)."""

    name = "bitdelta"
    needs_calibration = False

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        n, k = delta.shape
        w = pad_columns(delta, LAYOUT.padded_k(k))
        alpha = float(delta.to(torch.float32).abs().mean()) if delta.numel() else 0.0
        codes = (w >= 0).to(torch.uint8)
        scales = torch.full((n, 1), 2.0 * alpha, dtype=torch.float32, device=w.device)
        return fmt.pack_qlinear(codes, scales, LAYOUT, (n, k), codec=self.name)

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, **LAYOUT.to_dict()}


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
    lr: float = 0.02,
    device: str = "cpu",
    seed: int = 0,
) -> dict[str, Any]:
    """Train the α of every ``bitdelta`` tensor of the delta folder ``delta`` against the
    fine-tune's logits and rewrite the folder in place. ``base``/``finetuned``: model folders.

    Tensors with added rows (``extra_rows``) keep their α. Returns {"steps", "kl_first", "kl_last",
    "tensors"}; the same record lands in delta_config.json under compression["distill"].
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
    train = [
        n
        for n, p in packed.items()
        if p.codec == BitDeltaCodec.name and p.kind == "qlinear" and "extra_rows" not in p.parts
    ]
    if not train:
        return {"steps": 0, "tensors": 0}

    dev = torch.device(device)
    student = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).to(dev).eval()
    teacher = AutoModelForCausalLM.from_pretrained(str(finetuned), dtype=torch.float32).to(dev).eval()
    for m in (student, teacher):
        m.requires_grad_(False)
    params = dict(student.named_parameters(remove_duplicate=False))
    with torch.no_grad():  # the rest of the delta (norms, other codecs) is applied as stored
        for name, p in packed.items():
            if name not in train and name in params and "extra_rows" not in p.parts:
                params[name].add_(fmt.dequantize(p).reshape(params[name].shape).to(dev))
    signs, alpha0 = {}, {}
    for name in train:
        p = packed[name]
        d = fmt.dequantize(p)
        signs[name] = torch.sign(d).to(dev)
        alpha0[name] = float(p.parts["scales"][0, 0]) / 2
    log_scale = torch.zeros(len(train), device=dev, requires_grad=True)
    opt = torch.optim.Adam([log_scale], lr=lr)

    has_tok = (folder / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(folder) if has_tok else str(finetuned))
    ids = calibration_ids(tok, samples, seq_len, calibration_data, seed=seed)
    g = torch.Generator().manual_seed(seed)
    kls: list[float] = []
    for _ in range(steps):
        batch = ids[torch.randint(0, ids.shape[0], (batch_size,), generator=g)].to(dev)
        with torch.no_grad():
            target = torch.log_softmax(teacher(input_ids=batch).logits.float(), -1)
        weights = {
            name: params[name] + alpha0[name] * log_scale[i].exp() * signs[name]
            for i, name in enumerate(train)
        }
        logits = torch.func.functional_call(student, weights, args=(), kwargs={"input_ids": batch}).logits
        logp = torch.log_softmax(logits.float(), -1)
        kl = torch.nn.functional.kl_div(
            logp.flatten(0, 1), target.flatten(0, 1), log_target=True, reduction="batchmean"
        )
        opt.zero_grad()
        kl.backward()
        opt.step()
        kls.append(float(kl.detach()))

    factors = log_scale.detach().exp().cpu()
    for i, name in enumerate(train):
        p = packed[name]
        p.parts["scales"] = torch.full_like(p.parts["scales"], 2 * alpha0[name] * float(factors[i]))
    record = {
        "steps": steps,
        "lr": lr,
        "batch_size": batch_size,
        "seq_len": seq_len,
        "tensors": len(train),
        "kl_first": kls[0],
        "kl_last": kls[-1],
        "scale_factor_range": [float(factors.min()), float(factors.max())],
    }
    if any(math.isnan(k) for k in kls):
        raise FloatingPointError("bitdelta scale distillation diverged (NaN loss); lower lr")
    config.compression = {**config.compression, "distill": record}
    _rewrite(folder, packed, groups, config)
    return record

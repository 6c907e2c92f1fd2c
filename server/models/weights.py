"""Building a compact model from a Hugging Face model folder (config.json + safetensors)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from deltahub.errors import ModelSourceError, ShapeMismatchError


def read_config(folder: str | Path):
    """The folder's transformers config (AutoConfig handles old rope/naming conventions)."""
    from transformers import AutoConfig

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder}: no config.json; expected a Hugging Face model folder")
    return AutoConfig.from_pretrained(str(folder))


def safetensors_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / n for n in names]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelSourceError(f"{folder}: no safetensors weights (pickle checkpoints are not loaded)")
    return files


def iter_tensors(folder: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for f in safetensors_files(folder):
        with safe_open(str(f), framework="pt") as h:
            for name in h.keys():  # noqa: SIM118 - safe_open is not a dict
                yield name, h.get_tensor(name)


def load_weights(model: torch.nn.Module, folder: str | Path) -> None:
    """Copy the folder's tensors into ``model`` (same names as transformers), casting the dtype."""
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    for name, t in iter_tensors(folder):
        if name.endswith("rotary_emb.inv_freq"):
            continue
        p = params.get(name)
        if p is None:
            if name == "lm_head.weight" and getattr(model, "tied", False):
                continue
            raise ShapeMismatchError(f"{folder}: unexpected tensor {name!r} for {type(model).__name__}")
        if tuple(p.shape) != tuple(t.shape):
            raise ShapeMismatchError(
                f"{folder}: {name} has shape {tuple(t.shape)}, expected {tuple(p.shape)}"
            )
        with torch.no_grad():
            p.copy_(t.to(p.dtype))
        seen.add(name)
    tied = {"lm_head.weight"} if getattr(model, "tied", False) else set()
    missing = sorted(set(params) - seen - tied)
    if missing:
        raise ShapeMismatchError(
            f"{folder}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )

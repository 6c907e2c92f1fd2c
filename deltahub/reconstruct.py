"""Delta + base -> an ordinary transformers model folder (safetensors, config, tokenizer).

``reconstruct(delta, output)`` streams the base tensor by tensor, applies each delta
(``format.apply_delta``: base + Δ̂, with added vocabulary rows appended; base tensors the delta
does not mention are copied, except an lm_head the fine-tune ties) and writes safetensors
shards in the fine-tune's dtype, plus the fine-tune's config, generation config and tokenizer
files stored in the delta. The base defaults to the one recorded in ``delta_config.json`` and
its weights fingerprint must match the recorded one (BaseMismatchError otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from deltahub.checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint
from deltahub.compress import copy_model_files
from deltahub.errors import BaseMismatchError, ShapeMismatchError, UsageError
from deltahub.fingerprint import fingerprint
from deltahub.format import apply_delta
from deltahub.sources import resolve_model
from deltahub.store import DeltaReader

DEFAULT_SHARD_BYTES = 2 << 30
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _target_dtype(config_path: Path) -> torch.dtype | None:
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError):
        return None
    return _DTYPES.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or ""))


def check_base(reader: DeltaReader, base_path: Path, base_label: str) -> str:
    """Fingerprint of ``base_path``; BaseMismatchError naming both if the delta expects another."""
    want = reader.config.base_model.fingerprint
    got = fingerprint(base_path)
    if want and got != want:
        raise BaseMismatchError(
            f"delta {reader.folder} was made for base {reader.config.base_model.id} ({want}), but "
            f"{base_label} has different weights ({got})")
    return got


def _write_shards(tensors, output: Path, max_shard_bytes: int) -> list[str]:
    """Save (name, tensor) pairs into safetensors shards named like transformers' own."""
    from safetensors.torch import save_file

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    tmp_names: list[str] = []
    weight_map: dict[str, int] = {}

    def flush() -> None:
        name = f".shard-{len(tmp_names):05d}.tmp"
        save_file(shards[-1], str(output / name), metadata={"format": "pt"})
        tmp_names.append(name)

    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            flush()
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
        weight_map[name] = len(shards) - 1
        if len(shards) > 1:  # earlier shards are on disk: free them
            shards[-2] = {}
    flush()
    n = len(tmp_names)
    final = [SINGLE_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    for tmp, fin in zip(tmp_names, final, strict=True):
        os.replace(output / tmp, output / fin)
    if n > 1:
        total = sum((output / f).stat().st_size for f in final)
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: final[v] for k, v in weight_map.items()}}
        (output / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return final


def reconstruct(delta: str | os.PathLike, output: str | os.PathLike, *, base: str | os.PathLike | None = None,
                token: str | None = None, progress: bool = True,
                max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Rebuild the fine-tune of ``delta`` (folder or Hub id) into folder ``output``; returns it.

    ``base`` (folder or Hub id) defaults to the base recorded in the delta (at its revision).
    """
    from tqdm.auto import tqdm

    d = resolve_model(delta, token=token, kind="delta")
    reader = DeltaReader(d.path)
    cfg = reader.config
    base_ref = os.fspath(base) if base is not None else cfg.base_model.id
    b = resolve_model(base_ref, revision=None if base is not None else cfg.base_model.revision, token=token)
    out = Path(output)
    if out.resolve() in (b.path.resolve(), d.path.resolve()):
        raise UsageError(f"--output {out} is one of the input folders")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"--output {out} exists and is not an empty folder")
    check_base(reader, b.path, base_ref)
    cb = Checkpoint(b.path)
    dtype = _target_dtype(d.path / "config.json")
    names = reader.names()
    embedding = next((n for n in names if cfg.tensors[n]["group"] == "embedding"), None)

    def tensors():
        for name in tqdm(names, desc="reconstruct", unit="tensor", disable=not progress):
            base_name = name
            if name not in cb and cfg.tensors[name]["group"] == "lm_head" and embedding in cb:
                base_name = embedding  # the base ties its lm_head to the embedding
            if base_name not in cb:
                raise ShapeMismatchError(f"base {base_ref} has no tensor {name!r}, which the delta changes")
            base_t = cb.get(base_name)
            try:
                t = apply_delta(base_t, reader.read(name))
            except ShapeMismatchError as e:
                raise ShapeMismatchError(f"{name}: {e} (base {base_ref})") from None
            yield name, t.to(dtype or base_t.dtype).contiguous()
        for name in cb.names():  # absent from the delta: the fine-tune has the base's value
            if name in cfg.tensors or (cfg.tie_word_embeddings and name.endswith("lm_head.weight")):
                continue
            t = cb.get(name)
            yield name, (t.to(dtype) if dtype and t.is_floating_point() else t).contiguous()

    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        _write_shards(tensors(), out, max_shard_bytes)
        copy_model_files(d.path, out)
    except BaseException:
        if created:  # leave nothing half-written behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    return out

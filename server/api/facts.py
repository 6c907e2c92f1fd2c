"""What /info and /v1/models say about a variant beyond the engine's VariantInfo: its codec and
kind, read from its folder (delta_config.json / adapter_config.json) when the engine does not say."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any


def variant_folder(engine, v) -> Path | None:
    """The variant's local folder: the engine's host copy (Hub downloads) or its source folder."""
    host = None
    cache = getattr(getattr(engine, "engine", engine), "cache", None)
    if cache is not None and hasattr(cache, "host_object"):
        with contextlib.suppress(Exception):
            host = cache.host_object(v.name)
    folder = getattr(host, "folder", None)
    if folder is None and getattr(v, "source", None) and Path(v.source).is_dir():
        folder = Path(v.source)
    return Path(folder) if folder is not None else None


def kind_of(engine, v) -> str:
    """"delta" / "lora": the engine's, or read from the folder before the first load ("" unknown)."""
    kind = getattr(v, "kind", None)
    if kind:
        return str(kind)
    folder = variant_folder(engine, v)
    if folder is not None and (folder / "adapter_config.json").is_file():
        return "lora"
    if folder is not None and (folder / "delta_config.json").is_file():
        return "delta"
    return ""


def codec_of(engine, v, memo: dict[tuple, Any]) -> dict | str | None:
    """The engine's codec if it gives one, else {"name", "bits", "sparsity", "group_size",
    "lossless"} from delta_config.json or {"name": "peft-lora", "rank"} (memoized per variant)."""
    codec = getattr(v, "codec", None)
    if codec is not None:
        return codec if isinstance(codec, dict | str) else str(codec)
    key = (v.name, getattr(v, "source", None), getattr(v, "tier", None))
    if key not in memo:
        memo[key] = codec_from_folder(variant_folder(engine, v))
    return memo[key]


def codec_from_folder(folder: Path | None) -> dict | str | None:
    if folder is None:
        return None
    if (folder / "adapter_config.json").is_file():
        try:
            cfg = json.loads((folder / "adapter_config.json").read_text())
            return {"name": "peft-lora", "rank": cfg.get("r")}
        except (OSError, ValueError):
            return "peft-lora"
    try:
        comp = json.loads((folder / "delta_config.json").read_text()).get("compression") or {}
    except (OSError, ValueError):
        return None
    linear = (comp.get("groups") or {}).get("linear") or {}
    codec = {"name": comp.get("method") or linear.get("codec"), "bits": linear.get("bits"),
             "sparsity": linear.get("sparsity"), "group_size": linear.get("group_size"),
             "lossless": comp.get("lossless")}
    return {k: val for k, val in codec.items() if val is not None} or None

"""A cheap, reproducible fingerprint of a model's base weights.

Recipe (the Hub side computes the same value from the LFS sha256 the Hub lists for each file):

1. The weight files are ``deltahub.checkpoint.weight_files(folder)``: the files named in
   ``model.safetensors.index.json``'s ``weight_map``, else ``model.safetensors``, else every
   top-level ``*.safetensors``.
2. For each, its file name (relative to the model root, e.g. ``model-00001-of-00002.safetensors``)
   and the lowercase hex sha256 of its bytes (= the Git LFS oid).
3. Lines ``f"{name} {sha256}\\n"`` sorted by name, concatenated and UTF-8 encoded; the fingerprint
   is ``"sha256:" + sha256(those bytes).hexdigest()``.

Local files are hashed once and remembered in ``constants.cache_dir()/fingerprints.json`` keyed
by real path, size and mtime. Inside a Hugging Face cache snapshot a weight file is a link to
``blobs/<sha256>``: the blob name is used directly and nothing is read.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

from deltahub import constants
from deltahub.checkpoint import weight_files

_SHA256 = re.compile(r"[0-9a-f]{64}")
CACHE_NAME = "fingerprints.json"


def combine(files: Iterable[tuple[str, str]]) -> str:
    """``(name, sha256 hex)`` pairs -> ``"sha256:<hex>"`` (step 3 of the recipe)."""
    lines = "".join(f"{name} {sha.lower()}\n" for name, sha in sorted(files))
    return "sha256:" + hashlib.sha256(lines.encode()).hexdigest()


def _cache_path() -> Path:
    return constants.cache_dir() / CACHE_NAME


def _load_cache() -> dict[str, str]:
    try:
        data = json.loads(_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _save_cache(cache: dict[str, str]) -> None:
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{CACHE_NAME}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=0, sort_keys=True))
        os.replace(tmp, path)
    except OSError:  # a read-only cache only costs re-hashing next time
        pass


def file_sha256(path: str | os.PathLike, cache: dict[str, str] | None = None) -> str:
    """Hex sha256 of a file: the HF-cache blob name if it is one, else the cached or computed
    digest (``cache`` is updated in place when given)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and _SHA256.fullmatch(real.name):
        return real.name
    st = real.stat()
    key = f"{real}:{st.st_size}:{st.st_mtime_ns}"
    if cache is not None and key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(real, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    digest = h.hexdigest()
    if cache is not None:
        cache[key] = digest
    return digest


def fingerprint(folder: str | os.PathLike) -> str:
    """``"sha256:<hex>"`` of a local model folder's weight files (see the module docstring)."""
    folder = Path(folder)
    cache = _load_cache()
    before = dict(cache)
    value = combine((name, file_sha256(folder / name, cache)) for name in weight_files(folder))
    if cache != before:
        _save_cache(cache)
    return value

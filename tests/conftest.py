"""Shared fixtures: tiny Llama models, really trained (see deltahub.toy).

Set DELTAHUB_TOY_CACHE=/some/dir to reuse the trained models across pytest runs while developing;
CI leaves it unset and trains them afresh once per session (about a minute on 2 cores).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

TOY_TASKS = ("upper", "reverse", "double", "pirate")


def cached(root: Path, name: str, make) -> Path:
    """``root / name``, built by ``make(folder)`` into a private folder and renamed into place if
    missing (safe when runs share a cache)."""
    target = root / name
    if not target.exists():
        tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _build(root: Path) -> dict[str, Path]:
    from deltahub import toy

    root.mkdir(parents=True, exist_ok=True)
    paths = {"base": cached(root, "base", toy.make_base)}
    for task in TOY_TASKS:
        paths[task] = cached(root, task, lambda p, t=task: toy.make_finetune(paths["base"], p, t))
    return paths


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory) -> dict[str, Path]:
    """{"base": folder, "upper": folder, "reverse": ..., "double": ..., "pirate": ...}: a tiny base
    (hidden 256, 2 layers, GQA, fp32) and four full fine-tunes of it on different chat tasks."""
    cache = os.environ.get("DELTAHUB_TOY_CACHE")
    root = Path(cache) if cache else tmp_path_factory.mktemp("toy")
    return _build(root)


@pytest.fixture(scope="session")
def toy_tokenizer(toy_models):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(toy_models["base"]))


@pytest.fixture(scope="session")
def artifacts_root(tmp_path_factory) -> Path:
    """Where session fixtures keep what they build from the toy models (deltas, adapters)."""
    cache = os.environ.get("DELTAHUB_TOY_CACHE")
    root = Path(cache) / "engine-tests" if cache else tmp_path_factory.mktemp("artifacts")
    root.mkdir(parents=True, exist_ok=True)
    return root


@pytest.fixture(scope="session")
def toy_deltas(toy_models, artifacts_root) -> dict[str, Path]:
    """{task: delta folder}: each toy fine-tune compressed (RTN, 4-bit, 2:4) against the base."""
    from deltahub.compress import CompressConfig, compress

    cfg = CompressConfig(method="rtn", bits=4, sparsity="2:4")
    return {t: cached(artifacts_root, f"delta-{t}",
                      lambda p, t=t: compress(toy_models["base"], toy_models[t], p, cfg, progress=False))
            for t in TOY_TASKS}

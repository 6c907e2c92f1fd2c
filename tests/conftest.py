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


def _atomic(target: Path, make) -> Path:
    """Build into a private folder and rename it into place (safe when runs share a cache)."""
    if not (target / "config.json").exists():
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
    paths = {"base": _atomic(root / "base", toy.make_base)}
    for task in TOY_TASKS:
        paths[task] = _atomic(root / task, lambda p, t=task: toy.make_finetune(paths["base"], p, t))
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

"""Environment read in one place. Functions, not module constants, so tests can set variables."""

from __future__ import annotations

import os
from pathlib import Path


def debug() -> bool:
    """DELTAHUB_DEBUG=1: the CLI shows tracebacks instead of one-line errors."""
    return os.environ.get("DELTAHUB_DEBUG", "") not in ("", "0", "false", "False")


def cache_dir() -> Path:
    """deltahub's own cache (fingerprints, demo artifacts): $DELTAHUB_CACHE or $HF_HOME/deltahub."""
    if os.environ.get("DELTAHUB_CACHE"):
        return Path(os.environ["DELTAHUB_CACHE"])
    hf_home = os.environ.get("HF_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "huggingface")
    return Path(hf_home) / "deltahub"

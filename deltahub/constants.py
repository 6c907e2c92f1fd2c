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


def _true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def hf_endpoint() -> str:
    """The Hub to talk to: $HF_ENDPOINT (e.g. an embedded ``deltahub hub serve``) or huggingface.co."""
    return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def hf_hub_cache() -> Path:
    """huggingface_hub's download cache: $HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")).expanduser() / "hub"


def hf_offline() -> bool:
    """HF_HUB_OFFLINE=1 (or TRANSFORMERS_OFFLINE=1): use the local cache only, never the network."""
    return _true("HF_HUB_OFFLINE") or _true("TRANSFORMERS_OFFLINE")


def hf_disable_xet() -> bool:
    """HF_HUB_DISABLE_XET=1: plain LFS transfers (what the embedded Hub speaks)."""
    return _true("HF_HUB_DISABLE_XET")


def hf_disable_progress_bars() -> bool:
    """HF_HUB_DISABLE_PROGRESS_BARS=1: no download/upload progress bars."""
    return _true("HF_HUB_DISABLE_PROGRESS_BARS")

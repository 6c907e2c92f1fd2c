"""The embedded Hub with another huggingface_hub release (0.36, the oldest that deltahub
supports), run in a subprocess so that its import-time configuration is the user's.

Needs a ``pip install --target DIR huggingface_hub==0.36.0`` (with its dependencies); DIR comes
from $DELTAHUB_TEST_HF036 (default: .hf036 in the repo root,
where the README test command installs it). Skipped when it is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

HF036 = os.environ.get("DELTAHUB_TEST_HF036", str(Path(__file__).resolve().parents[2] / ".hf036"))


def run_client(localhub, tokens, tmp_path, pythonpath: str | None) -> str:
    """Run compat_client.py configured by environment only; returns the version it reports."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(localhub.client_env(), HF_HOME=str(tmp_path / "hf_home"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    script = Path(__file__).with_name("compat_client.py")
    out = subprocess.run(
        [sys.executable, str(script), tokens["write"], tokens["read"]],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-6000:]
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith("OK ")
    return last[3:]


@pytest.mark.skipif(
    not (Path(HF036) / "huggingface_hub").is_dir(),
    reason=f"huggingface_hub 0.36 not installed at {HF036}: run "
    f"`pip install --target {HF036} huggingface_hub==0.36.0` or set DELTAHUB_TEST_HF036",
)
def test_huggingface_hub_036_client(localhub, tokens, tmp_path):
    assert run_client(localhub, tokens, tmp_path, HF036) == "0.36.0"


def test_installed_client_configured_by_environment(localhub, tokens, tmp_path):
    import huggingface_hub

    assert run_client(localhub, tokens, tmp_path, None) == huggingface_hub.__version__

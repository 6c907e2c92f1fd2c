"""Packaging: server/ and kernels/ install as deltahub.server / deltahub.kernels, both from the
editable install used by the tests and from a built wheel; `deltahub --help` stays light."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ["deltahub", "deltahub.server", "deltahub.kernels", "deltahub.server.api", "deltahub.model_cards"]
HEAVY = ("torch", "transformers", "huggingface_hub", "fastapi", "gradio", "triton")


def _run_python(code: str, cwd: Path, pythonpath: str | None = None) -> str:
    env = {**os.environ, "PYTHONPATH": pythonpath} if pythonpath else None
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                         check=True)
    return out.stdout


def _import_paths(cwd: Path, pythonpath: str | None = None) -> dict[str, str]:
    code = ("import importlib, json; "
            f"print(json.dumps({{m: importlib.import_module(m).__file__ for m in {MODULES!r}}}))")
    return json.loads(_run_python(code, cwd, pythonpath))


def test_editable_install_maps_packages(tmp_path):
    paths = _import_paths(tmp_path)
    assert Path(paths["deltahub.server"]).parent == ROOT / "server"
    assert Path(paths["deltahub.kernels"]).parent == ROOT / "kernels"


def test_wheel_contains_and_imports_all_packages(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path / "dist"), str(ROOT)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("deltahub-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ["deltahub/server/__init__.py", "deltahub/kernels/__init__.py", "deltahub/format.py",
                     "deltahub/server/api/__init__.py", "deltahub/cli/main.py"]:
        assert required in names, required
    assert not any(n.startswith(("server/", "kernels/", "tests/")) for n in names)
    assert any(n.startswith("deltahub/model_cards/") and n.endswith(".md") for n in names)
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                    str(wheel)], check=True, capture_output=True)
    for m, f in _import_paths(tmp_path, str(target)).items():
        assert Path(f).is_relative_to(target), (m, f)


def test_cli_help_is_light(tmp_path):
    code = ("import sys; from deltahub.cli.main import build_parser; build_parser(); "
            f"print(sorted(m for m in {HEAVY!r} if m in sys.modules))")
    assert _run_python(code, tmp_path).strip() == "[]"

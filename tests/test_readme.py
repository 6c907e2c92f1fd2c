"""README.md's two set-up commands: CI runs the test command verbatim, and both stay well-formed."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, str]:
    text = (ROOT / "README.md").read_text()
    found = dict(re.findall(r"<!-- (demo|tests) command -->\n```(?:bash|sh)?\n(.+?)\n```", text, re.S))
    assert set(found) == {"demo", "tests"}, "README must mark its demo and tests commands"
    return found


def test_ci_runs_the_readme_test_command():
    cmd = _commands()["tests"]
    assert "\n" not in cmd
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmd in ci, ".ci/run must run README's test command verbatim"


def test_demo_command_installs_and_runs_the_demo():
    cmd = _commands()["demo"]
    assert "\n" not in cmd and "pip install" in cmd and cmd.rstrip().endswith("deltahub demo")
    assert "torch==2.13.0" in cmd  # never pull a multi-GB CUDA torch on a CPU machine

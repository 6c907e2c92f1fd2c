"""CI: run README.md's demo command from this clone, in the background with a timeout, and check
it end to end: the playground URL answers, /v1/models lists the demo's variants, one chat round
trip succeeds. Prints the seconds from start to serving (the ≤ 3 minute target).

Usage: python3 .ci/check_demo.py   (from the repo root; uses a fresh DELTAHUB_CACHE)
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600


def readme_demo_command() -> str:
    text = (ROOT / "README.md").read_text()
    return re.search(r"<!-- demo command -->\n```(?:bash|sh)?\n(.+?)\n```", text, re.S).group(1)


def main() -> int:
    cmd = readme_demo_command()
    env = {**os.environ, "DELTAHUB_CACHE": tempfile.mkdtemp(prefix="demo-cache-"), "PYTHONUNBUFFERED": "1"}
    for k in ("HF_ENDPOINT", "HF_HOME", "HF_TOKEN", "HF_HUB_OFFLINE"):
        env.pop(k, None)
    t0 = time.time()
    proc = subprocess.Popen(["bash", "-c", cmd], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    lines: list[str] = []
    ready = threading.Event()
    demo_start: list[float] = []

    def pump() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            lines.append(line.rstrip("\n"))
            print(f"demo {time.time() - t0:5.0f}s| {lines[-1]}", flush=True)
            if line.startswith("[1]") and not demo_start:
                demo_start.append(time.time())
            if line.startswith("ready in"):
                ready.set()

    threading.Thread(target=pump, daemon=True).start()
    try:
        while not ready.wait(1):
            if proc.poll() is not None or time.time() - t0 > TIMEOUT_S:
                print(f"FAIL: demo not serving after {time.time() - t0:.0f} s (exit {proc.poll()})")
                return 1
        serving_s = time.time() - t0
        demo_s = time.time() - (demo_start[0] if demo_start else t0)
        text = "\n".join(lines)
        server = re.search(r"deltahub serve: (http://\S+)", text).group(1)
        ui = re.search(r"playground: (http://\S+)", text).group(1)
        with urllib.request.urlopen(ui, timeout=30) as r:
            assert r.status == 200, f"playground answered {r.status}"
        with urllib.request.urlopen(f"{server}/v1/models", timeout=30) as r:
            ids = {m["id"] for m in json.load(r)["data"]}
        variants = {i for i in ids if i.removesuffix("-delta") in text and "/" not in i}
        assert len(variants) >= 2, f"/v1/models lists {sorted(ids)}: expected the base and >= 2 variants"
        name = sorted(variants)[0]
        body = json.dumps({"model": name, "messages": [{"role": "user", "content": "hello world"}],
                           "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(f"{server}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.load(r)["choices"][0]["message"]["content"]
        assert reply.strip(), "empty chat reply"
        print(f"demo check passed: serving {serving_s:.0f} s after the command started (install included), "
              f"{demo_s:.0f} s after `deltahub demo` started; /v1/models {sorted(ids)}; "
              f"{name!r} replied {reply!r}")
        return 0
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())

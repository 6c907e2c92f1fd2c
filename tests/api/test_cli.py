"""``deltahub serve`` in a subprocess: flags, API key from a file (never printed), clean shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx

from deltahub import toy
from deltahub.cli.main import build_parser

from .conftest import free_port


def test_serve_flags_parse():
    args = build_parser().parse_args(
        [
            "serve",
            "--base",
            "b",
            "--variant",
            "a=x",
            "--variant",
            "c=y",
            "--max-gpu-variants",
            "3",
            "--max-host-variants",
            "5",
            "--device",
            "cpu",
            "--port",
            "9",
            "--dynamic-variants",
        ]
    )
    assert args.variant == ["a=x", "c=y"] and args.max_gpu_variants == 3 and args.max_host_variants == 5
    assert args.dynamic_variants and args.port == 9 and args.host == "127.0.0.1"


def test_serve_subprocess(toy_models, api_variants, tmp_path):
    key = "k3y-from-file-123"
    (tmp_path / "key").write_text(key + "\n")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "deltahub.cli.main",
        "serve",
        "--base",
        str(toy_models["base"]),
        "--variant",
        f"upper={api_variants['upper']}",
        "--variant",
        f"lora={api_variants['lora']}",
        "--port",
        str(port),
        "--api-key-file",
        str(tmp_path / "key"),
        "--max-model-len",
        "128",
        "--max-num-seqs",
        "4",
        "--model-id",
        "toy",
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)
        auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/info", timeout=10).status_code == 401
        body = {
            "inputs": toy.chat_text("green tea"),
            "parameters": {"adapter_id": "upper", "max_new_tokens": 4},
        }
        r = httpx.post(f"{url}/generate", json=body, headers=auth, timeout=60)
        assert r.status_code == 200 and r.headers["x-adapter-id"] == "upper"
        info = httpx.get(f"{url}/info", headers=auth, timeout=10).json()
        assert info["model_id"] == "toy" and info["max_total_tokens"] == 128
        assert {v["name"] for v in info["variants"]} == {"upper", "lora"}
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
    assert proc.returncode == 0, out
    assert key not in out and "POST /generate" in out

"""``deltahub hub serve`` as a user runs it: a foreground process printing its URL."""

from __future__ import annotations

import re
import signal
import subprocess
import sys

from huggingface_hub import HfApi

CLI = [sys.executable, "-m", "deltahub.cli.main", "hub", "serve"]


def test_hub_serve_cli(tmp_path):
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("# team tokens\nalice:write:hf_cli_w\n\nbob:read:hf_cli_r\n")
    proc = subprocess.Popen(
        [*CLI, "--root", str(tmp_path / "root"), "--port", "0", "--token-file", str(tokens), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        line = proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+) \(2 token\(s\)\)", line)
        assert m, line + proc.stderr.read() if proc.poll() is not None else line
        api = HfApi(endpoint=m.group(1), token="hf_cli_w")
        api.create_repo("alice/from-cli")
        api.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/from-cli")
        assert HfApi(endpoint=m.group(1), token="hf_cli_r").list_repo_files("alice/from-cli") == [
            ".gitattributes",
            "x.txt",
        ]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=20)
    assert proc.returncode == 130
    assert (tmp_path / "root" / "repos" / "models" / "alice" / "from-cli" / "repo.json").is_file()


def test_hub_serve_rejects_bad_token_spec(tmp_path):
    out = subprocess.run([*CLI, "--root", str(tmp_path), "--token", "alice:admin:x"], capture_output=True,
                         text=True, timeout=60)  # fmt: skip
    assert out.returncode == 1
    assert "error: bad token spec for user 'alice': role must be one of" in out.stderr

"""Failure modes over raw HTTP: path traversal is refused, a killed or short upload leaves nothing
visible, a forged upload URL or wrong bytes are rejected, an LFS pointer must name an object
uploaded to that repo, and temp files of a crashed server are removed at start."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from urllib.parse import urlsplit

import httpx
import pytest


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def ndjson(*items):
    return b"".join(json.dumps(i).encode() + b"\n" for i in items)


def header(title="t", **extra):
    return {"key": "header", "value": {"summary": title, "description": "", **extra}}


def commit_raw(hub, token, repo_id, *ops, rev="main"):
    return httpx.post(f"{hub.url}/api/models/{repo_id}/commit/{rev}", content=ndjson(header(), *ops),
                      headers={**auth(token), "Content-Type": "application/x-ndjson"})  # fmt: skip


def batch(hub, token, repo_id, data):
    oid = hashlib.sha256(data).hexdigest()
    body = {"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]}
    r = httpx.post(f"{hub.url}/{repo_id}.git/info/lfs/objects/batch", json=body, headers=auth(token))
    r.raise_for_status()
    return oid, r.json()["objects"][0]


def leftovers(hub):
    return [p.name for p in hub.storage.objects.tmp.iterdir()]


def wait_for(cond, timeout=10.0):
    end = time.time() + timeout
    while time.time() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


BAD_PATHS = ["../evil.txt", "/etc/passwd", "a/../../b.txt", "a//b.txt", "./x", ".git/config", "a\\..\\b", ""]


@pytest.mark.parametrize("path", BAD_PATHS)
def test_path_traversal_refused_on_commit(localhub, repo_id, tokens, path):
    add = {
        "key": "file",
        "value": {"path": path, "content": base64.b64encode(b"x").decode(), "encoding": "base64"},
    }
    r = commit_raw(localhub, tokens["write"], repo_id, add)
    assert r.status_code == 400, r.text
    r = commit_raw(localhub, tokens["write"], repo_id, {"key": "deletedFile", "value": {"path": path}})
    assert r.status_code in (400, 404)
    files = [p.relative_to(localhub.storage.root) for p in localhub.storage.root.rglob("evil*")]
    assert files == []


def test_path_traversal_refused_on_read(localhub, repo_id):
    for raw in ("..%2F..%2Fetc%2Fpasswd", "%2Fetc%2Fpasswd", "a%2F..%2F..%2Frepo.json"):
        r = httpx.get(f"{localhub.url}/{repo_id}/resolve/main/{raw}")
        assert r.status_code == 400, raw
        r = httpx.get(f"{localhub.url}/api/models/{repo_id}/tree/main/{raw}")
        assert r.status_code in (400, 404) and r.headers["X-Error-Message"], raw
    # a raw "../" in the URL path cannot climb out of the repo either
    host, port = urlsplit(localhub.url).hostname, urlsplit(localhub.url).port
    with socket.create_connection((host, port)) as s:
        s.sendall(f"GET /{repo_id}/resolve/main/../../../repo.json HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        assert s.recv(100).split()[1] == b"400"


def test_upload_dropped_mid_body_leaves_nothing(localhub, repo_id, tokens):
    data = os.urandom(3 * 1024 * 1024)
    oid, obj = batch(localhub, tokens["write"], repo_id, data)
    href = urlsplit(obj["actions"]["upload"]["href"])
    with socket.create_connection((href.hostname, href.port)) as s:
        s.sendall(
            f"PUT {href.path}?{href.query} HTTP/1.1\r\nHost: x\r\n"
            f"Content-Length: {len(data)}\r\n\r\n".encode()
        )
        s.sendall(data[: len(data) // 2])
        assert wait_for(lambda: any(n.startswith("upload-") for n in leftovers(localhub)))
    assert wait_for(lambda: not leftovers(localhub)), leftovers(localhub)  # temp file removed
    assert not localhub.storage.objects.has(oid)
    r = httpx.post(
        obj["actions"]["verify"]["href"], json={"oid": oid, "size": len(data)}, headers=auth(tokens["write"])
    )
    assert r.status_code == 404
    lfs = {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}}
    assert commit_raw(localhub, tokens["write"], repo_id, lfs).status_code == 400
    # the same upload, complete this time, lands
    assert httpx.put(obj["actions"]["upload"]["href"], content=data).status_code == 200
    assert commit_raw(localhub, tokens["write"], repo_id, lfs).status_code == 200


KILLED_CLIENT = r"""
import socket, sys, time
host, port, target, size = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
s = socket.create_connection((host, port))
s.sendall(f"PUT {target} HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n".encode())
s.sendall(b"\1" * (size // 3))
print("sent", flush=True)
time.sleep(60)
"""


def test_killed_uploader_process_leaves_nothing(localhub, repo_id, tokens):
    data = b"\1" * (12 * 1024 * 1024)
    oid, obj = batch(localhub, tokens["write"], repo_id, data)
    href = urlsplit(obj["actions"]["upload"]["href"])
    args = [sys.executable, "-c", KILLED_CLIENT, href.hostname, str(href.port), f"{href.path}?{href.query}"]
    proc = subprocess.Popen([*args, str(len(data))], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "sent"
        assert wait_for(lambda: any(n.startswith("upload-") for n in leftovers(localhub)))
    finally:
        proc.kill()
        proc.wait()
    assert wait_for(lambda: not leftovers(localhub)), leftovers(localhub)
    assert not localhub.storage.objects.has(oid)


def test_commit_dropped_mid_body_changes_nothing(localhub, repo_id, tokens):
    before = httpx.get(f"{localhub.url}/api/models/{repo_id}").json()["sha"]
    add = {
        "key": "file",
        "value": {"path": "x.txt", "content": base64.b64encode(b"x").decode(), "encoding": "base64"},
    }
    body = ndjson(header(), add)
    host, port = urlsplit(localhub.url).hostname, urlsplit(localhub.url).port
    with socket.create_connection((host, port)) as s:
        s.sendall(
            f"POST /api/models/{repo_id}/commit/main HTTP/1.1\r\nHost: x\r\n"
            f"Authorization: Bearer {tokens['write']}\r\nContent-Type: application/x-ndjson\r\n"
            f"Content-Length: {len(body) + 1000}\r\n\r\n".encode()
            + body
        )
    time.sleep(0.3)
    assert httpx.get(f"{localhub.url}/api/models/{repo_id}").json()["sha"] == before


def test_forged_url_and_wrong_bytes_are_rejected(localhub, repo_id, tokens):
    data = b"\0payload" * 1000
    oid, obj = batch(localhub, tokens["write"], repo_id, data)
    href = obj["actions"]["upload"]["href"]
    assert httpx.put(href.replace("sig=", "sig=0"), content=data).status_code == 401
    assert httpx.put(href, content=b"\0other!!" * 1000).status_code == 422  # same size, other sha256
    assert httpx.put(href, content=data[:-1]).status_code == 422
    assert not localhub.storage.objects.has(oid) and not leftovers(localhub)
    assert httpx.put(href, content=data).status_code == 200
    assert localhub.storage.objects.has(oid, len(data))


def test_lfs_pointer_must_be_uploaded_to_this_repo(api, localhub, repo_id, tokens):
    secret = b"\0private weights" * 100
    other = api.create_repo(f"{repo_id}-private", private=True).repo_id
    api.upload_file(path_or_fileobj=secret, path_in_repo="w.bin", repo_id=other)
    oid = hashlib.sha256(secret).hexdigest()
    assert localhub.storage.objects.has(oid)
    # carol knows the sha256 but never uploaded the bytes: she cannot graft them into her repo
    carol = api.create_repo("carol/grafting").repo_id
    lfs = {
        "key": "lfsFile",
        "value": {"path": "stolen.bin", "algo": "sha256", "oid": oid, "size": len(secret)},
    }
    assert commit_raw(localhub, tokens["write2"], carol, lfs).status_code == 400
    _, obj = batch(localhub, tokens["write2"], carol, secret)
    assert "actions" in obj  # she has to send the bytes themselves


def test_stale_temp_files_removed_at_start(tmp_path):
    from deltahub.localhub import LocalHub

    with LocalHub(tmp_path / "root") as hub:
        tmp = hub.storage.objects.tmp
    stale = tmp / "upload-deadbeef.part"
    stale.write_bytes(b"half")
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))
    staging = tmp / "repo-deadbeef"  # a repo creation killed before its rename
    (staging / "commits").mkdir(parents=True)
    os.utime(staging, (old, old))
    fresh = tmp / "upload-fresh.part"
    fresh.write_bytes(b"in flight elsewhere")
    with LocalHub(tmp_path / "root") as hub:
        assert not stale.exists() and not staging.exists() and fresh.exists()
        assert hub.storage.list_repos("model") == []


def test_upload_url_survives_restart_and_chunked_bodies(tmp_path):
    from huggingface_hub import HfApi

    from deltahub.localhub import LocalHub

    data = b"\0chunked" * 50_000
    with LocalHub(tmp_path / "root", tokens=["u:write:tw"]) as hub:
        HfApi(endpoint=hub.url, token="tw").create_repo("u/r")
        oid, obj = batch(hub, "tw", "u/r", data)
        path = urlsplit(obj["actions"]["upload"]["href"])
    with LocalHub(tmp_path / "root", tokens=["u:write:tw"]) as hub:  # new process state, same root
        href = f"{hub.url}{path.path}?{path.query}"
        pieces = (data[i : i + 65536] for i in range(0, len(data), 65536))
        r = httpx.put(href, content=pieces)  # a generator body goes out chunked
        assert r.status_code == 200, r.text
        assert hub.storage.objects.has(oid, len(data))

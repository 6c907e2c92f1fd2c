"""Write-side routes of the embedded Hub: preupload (LFS or regular per file), the git-lfs batch
API with the "basic" transfer (signed PUT URLs, streamed to disk, hashed, renamed into the object
store only when complete and matching), LFS verify, and the NDJSON commit endpoint (add, lfsFile,
deletedFile, deletedFolder; copies arrive as adds; ``parentCommit`` honoured)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from .errors import BadRequest, HubError, NotFound, PayloadError, Unauthorized
from .httpd import Request, Response, json_response
from .objects import SHA256_RE, IncompleteUploadError, ObjectMismatchError
from .storage import COMMIT_RE, RepoKey
from .trees import check_path, file_entry, upload_mode

if TYPE_CHECKING:
    from .app import HubApp

UPLOAD_URL_TTL_S = 3600
NDJSON_LINE_LIMIT = 1 << 30
LFS_JSON = "application/vnd.git-lfs+json"


def preupload(app: HubApp, req: Request, key: RepoKey, revision: str) -> Response:
    body = req.json()
    app.writable(req, key, "upload files")
    head = app.storage.resolve(key, revision)
    tree = app.storage.commit(key, head).tree
    attrs = app.storage.gitattributes(key, head)
    out = []
    for f in body.get("files") or []:
        path = check_path(str(f.get("path")))
        try:
            sample = base64.b64decode(f.get("sample") or "")
            size = int(f["size"])
        except (KeyError, TypeError, ValueError, binascii.Error):
            raise BadRequest(f"Invalid preupload entry for {path!r}") from None
        mode = upload_mode(attrs, path, size, sample)
        remote = tree.get(path)
        oid = None
        if remote is not None:  # lets the client skip files that did not change
            oid = remote["sha256"] if mode == "lfs" else _git_oid_of(app, remote, size)
        out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return json_response({"files": out, "commitOid": head})


def _git_oid_of(app: HubApp, entry: dict, new_size: int) -> str:
    """Git blob id of a file's content (what the client computes for a regular file)."""
    if not entry["lfs"] or entry["size"] != new_size:  # a size change never matches: skip hashing
        return entry["oid"]
    h = hashlib.sha1(b"blob %d\0" % entry["size"])
    for chunk in app.storage.objects.iter_range(entry["sha256"]):
        h.update(chunk)
    return h.hexdigest()


def _sign(app: HubApp, key: RepoKey, oid: str, size: int, exp: int) -> str:
    msg = f"{key.rel}\n{oid}\n{size}\n{exp}".encode()
    return hmac.new(app.secret, msg, hashlib.sha256).hexdigest()


def lfs_batch(app: HubApp, req: Request, key: RepoKey) -> Response:
    body = req.json()
    app.writable(req, key, "upload files")
    if body.get("operation") != "upload":
        raise HubError("Only the 'upload' operation is supported; download through /resolve", status=422)
    exp = int(time.time()) + UPLOAD_URL_TTL_S
    expires_at = datetime.fromtimestamp(exp, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    objects = []
    for obj in body.get("objects") or []:
        oid, size = obj.get("oid"), obj.get("size")
        if not isinstance(oid, str) or not SHA256_RE.match(oid) or not isinstance(size, int) or size < 0:
            objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                            "error": {"code": 422, "message": "Invalid oid or size"}})  # fmt: skip
            continue
        item: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
        if not app.storage.has_lfs(key, oid, size):
            sig = _sign(app, key, oid, size, exp)
            href = f"{req.base_url}/_localhub/lfs/{key.type}/{key.id}/{oid}?size={size}&exp={exp}&sig={sig}"
            prefix = "" if key.type == "model" else f"{key.type}s/"
            verify = f"{req.base_url}/{prefix}{key.id}.git/info/lfs/objects/verify"
            item["actions"] = {
                "upload": {"href": href, "expires_at": expires_at},
                "verify": {"href": verify, "expires_at": expires_at},
            }
        objects.append(item)
    return json_response({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                         headers={"Content-Type": LFS_JSON})  # fmt: skip


def lfs_put(app: HubApp, req: Request, key: RepoKey, oid: str) -> Response:
    """Receive one LFS object on a signed URL. The body streams to tmp/ while hashed; only a
    complete body with the announced sha256 and size becomes visible (renamed into objects/)."""
    try:
        size, exp, sig = int(req.arg("size") or -1), int(req.arg("exp") or 0), req.arg("sig") or ""
    except ValueError:
        raise Unauthorized("Malformed upload URL") from None
    if not hmac.compare_digest(sig, _sign(app, key, oid, size, exp)) or exp < time.time():
        raise Unauthorized("Upload URL is invalid or expired: ask the LFS batch endpoint for a new one")
    app.storage.meta(key)
    declared = req.body.left if not req.body.chunked else None
    if declared is not None and declared != size:
        raise PayloadError(f"Content-Length {declared} does not match the announced size {size}")
    try:
        app.storage.objects.put_stream(req.body.iter_chunks(), expected_sha256=oid, expected_size=size)
    except ObjectMismatchError as e:
        raise PayloadError(str(e)) from None
    except IncompleteUploadError as e:
        raise PayloadError(str(e)) from None
    app.storage.add_lfs_marker(key, oid)
    return Response(200, {"ETag": f'"{oid}"'})


def lfs_verify(app: HubApp, req: Request, key: RepoKey) -> Response:
    body = req.json()
    app.writable(req, key, "upload files")
    oid, size = body.get("oid"), body.get("size")
    if not isinstance(oid, str) or not SHA256_RE.match(oid):
        raise BadRequest("Invalid oid")
    if not app.storage.has_lfs(key, oid, size if isinstance(size, int) else None):
        raise NotFound(f"LFS object {oid} (size {size}) was not uploaded to {key.id}")
    return json_response({"success": True}, headers={"Content-Type": LFS_JSON})


def _parse_line(raw: bytes) -> tuple[str, dict]:
    try:
        item = json.loads(raw)
        return str(item["key"]), dict(item["value"])
    except (ValueError, KeyError, TypeError):
        raise BadRequest('Invalid NDJSON commit line: expected {"key": ..., "value": {...}}') from None


def commit(app: HubApp, req: Request, key: RepoKey, revision: str) -> Response:
    """NDJSON body: a header line then one operation per line. Regular file contents go to the
    object store as they stream in (invisible until a commit references them); refs move once,
    under the repo lock, in Storage.apply_commit."""
    app.writable(req, key, "commit")
    lines = req.body.iter_lines(NDJSON_LINE_LIMIT)
    header: dict | None = None
    ops = []
    for raw in lines:
        kind, value = _parse_line(raw)
        if kind == "header":
            header = value
            continue
        if header is None:
            raise BadRequest("The first NDJSON line of a commit must be the header")
        path = str(value.get("path") or "")
        if kind == "file":
            check_path(path)
            content = value.get("content") or ""
            try:
                data = (
                    base64.b64decode(content, validate=True)
                    if value.get("encoding") == "base64"
                    else content.encode()
                )
            except (binascii.Error, ValueError):
                raise BadRequest(f"Invalid base64 content for {path!r}") from None
            sha = app.storage.objects.put_bytes(data, fsync=False)  # synced once below
            ops.append(("add", path, file_entry(sha, len(data), False, data)))
        elif kind == "lfsFile":
            check_path(path)
            oid = str(value.get("oid") or "")
            size = value.get("size")
            if value.get("algo", "sha256") != "sha256" or not SHA256_RE.match(oid):
                raise BadRequest(f"Invalid LFS pointer for {path!r}")
            if not app.storage.has_lfs(key, oid, size if isinstance(size, int) else None):
                raise BadRequest(
                    f"Your push was rejected because an LFS pointer pointed to a file that does not exist: "
                    f"{path} ({oid}). Upload it through the LFS batch endpoint first."
                )
            ops.append(("add", path, file_entry(oid, app.storage.objects.size(oid), True)))
        elif kind == "deletedFile":
            ops.append(("delete_file", check_path(path)))
        elif kind == "deletedFolder":
            ops.append(("delete_folder", check_path(path.rstrip("/"))))
        else:
            raise BadRequest(f"Unsupported commit operation {kind!r}")
    if header is None:
        raise BadRequest("Empty commit payload")
    parent = header.get("parentCommit")
    if parent is not None and (not isinstance(parent, str) or not COMMIT_RE.match(parent)):
        raise BadRequest(f"Invalid parentCommit {parent!r}")
    title = str(header.get("summary") or "").strip()
    if not title:
        raise BadRequest("The commit summary (title) cannot be empty")
    if any(op[0] == "add" and not op[2]["lfs"] for op in ops):
        app.storage.objects.sync()  # contents are on disk before a ref can point to them
    c, pr = app.storage.apply_commit(
        key,
        revision,
        ops,
        title=title,
        message=str(header.get("description") or ""),
        author=req.principal.name or "anonymous",
        parent_commit=parent,
        create_pr=req.flag("create_pr"),
    )
    repo_url = key.url(req.base_url)
    return json_response(
        {
            "success": True,
            "commitOid": c.id,
            "commitUrl": f"{repo_url}/commit/{c.id}",
            "hookOutput": "",
            "pullRequestUrl": f"{repo_url}/discussions/{pr}" if pr else None,
        }
    )

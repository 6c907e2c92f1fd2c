"""Read-side file routes of the embedded Hub: tree listing (recursive, cursor-paginated with a
``Link`` header), paths-info, and ``resolve`` (HEAD/GET with X-Repo-Commit, ETag,
X-Linked-Etag/-Size for LFS files, single byte ranges)."""

from __future__ import annotations

import itertools
import re
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .errors import BadRequest, EntryNotFound, RangeNotSatisfiable
from .httpd import Request, Response, json_response
from .objects import lfs_pointer
from .storage import RepoKey
from .trees import check_path, folder_oid, is_folder, list_tree

if TYPE_CHECKING:
    from .app import HubApp

TREE_PAGE = 1000  # the Hub's page size (50 with expand)
EXPAND_PAGE = 50
HISTORY_LIMIT = 1000  # commits walked to find each path's last commit (expand=True)
_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


def file_json(path: str, e: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "file", "oid": e["oid"], "size": e["size"], "path": path}
    if e["lfs"]:
        out["lfs"] = {
            "oid": e["sha256"],
            "size": e["size"],
            "pointerSize": len(lfs_pointer(e["sha256"], e["size"])),
        }
    return out


def folder_json(tree: dict, path: str) -> dict[str, Any]:
    return {"type": "directory", "oid": folder_oid(tree, path), "size": 0, "path": path}


def _add_last_commits(app: HubApp, key: RepoKey, head: str, items: list[dict]) -> None:
    """Fill ``lastCommit`` {id, title, date}: the newest first-parent commit that changed the path."""
    todo = {it["path"]: it for it in items}
    history = list(itertools.islice(app.storage.history(key, head), HISTORY_LIMIT))
    for i, c in enumerate(history):
        if not todo:
            break
        parent = history[i + 1].tree if i + 1 < len(history) else {}
        for path in list(todo):
            if _version(c.tree, path) != _version(parent, path):
                todo.pop(path)["lastCommit"] = {"id": c.id, "title": c.title, "date": c.date}


def _version(tree: dict, path: str) -> str | None:
    if path in tree:
        return tree[path]["oid"]
    return folder_oid(tree, path) if is_folder(tree, path) else None


def tree(app: HubApp, req: Request, key: RepoKey, revision: str, path: str) -> Response:
    app.readable(req, key)
    head = app.storage.resolve(key, revision)
    t = app.storage.commit(key, head).tree
    path = path.strip("/")
    if path:
        check_path(path)
        if not is_folder(t, path):
            raise EntryNotFound(f"{path} does not exist (or is not a folder) at revision {revision}")
    expand = req.flag("expand")
    recursive = req.flag("recursive")
    entries = list_tree(t, path, recursive)
    limit = int(req.arg("limit") or (EXPAND_PAGE if expand else TREE_PAGE))
    start = int(req.arg("cursor") or 0)
    page = entries[start : start + max(limit, 1)]
    items = [folder_json(t, p) if e is None else file_json(p, e) for p, e in page]
    if expand:
        _add_last_commits(app, key, head, items)
    headers = {}
    if start + len(page) < len(entries):
        url = f"{req.base_url}/api/{key.type}s/{key.id}/tree/{quote(revision, safe='')}"
        if path:
            url += "/" + quote(path, safe="")
        url += f"?recursive={str(recursive).lower()}&expand={str(expand).lower()}&limit={limit}"
        headers["Link"] = f'<{url}&cursor={start + len(page)}>; rel="next"'
    return json_response(items, headers=headers)


def paths_info(app: HubApp, req: Request, key: RepoKey, revision: str) -> Response:
    form = req.form_or_json()
    app.readable(req, key)
    head = app.storage.resolve(key, revision)
    t = app.storage.commit(key, head).tree
    expand = str((form.get("expand") or ["false"])[-1]).lower() in ("1", "true")
    items, seen = [], set()
    for raw in form.get("paths") or []:
        path = str(raw).strip("/")
        if not path or path in seen:
            continue
        seen.add(path)
        check_path(path)
        if path in t:
            items.append(file_json(path, t[path]))
        elif is_folder(t, path):
            items.append(folder_json(t, path))
    if expand:
        _add_last_commits(app, key, head, items)
    return json_response(items)


def _parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=a-b`` range -> [start, end) or None (whole file); 416 if unsatisfiable."""
    if not header:
        return None
    m = _RANGE_RE.match(header.strip())
    if m is None:
        if "," in header:
            return None  # several ranges: answer the whole file, as RFC 9110 allows
        raise BadRequest(f"Invalid Range header {header!r}")
    a, b = m.groups()
    if a == "" and b == "":
        raise BadRequest(f"Invalid Range header {header!r}")
    if a == "":
        start, end = max(size - int(b), 0), size
    else:
        start, end = int(a), size if b == "" else min(int(b) + 1, size)
    if start >= size or start >= end:
        if size == 0 and start == 0:
            return None
        raise RangeNotSatisfiable(
            f"Range {header} not satisfiable", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, end


def resolve(app: HubApp, req: Request, key: RepoKey, revision: str, path: str) -> Response:
    app.readable(req, key, download=True)
    commit = app.storage.resolve(key, revision)
    check_path(path)
    entry = app.storage.commit(key, commit).tree.get(path)
    if entry is None:
        raise EntryNotFound(
            f"Entry not found: {path} at revision {revision}", headers={"X-Repo-Commit": commit}
        )
    size = entry["size"]
    headers = {
        "X-Repo-Commit": commit,
        "Accept-Ranges": "bytes",
        "Content-Type": "application/octet-stream",
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}",
        "Cache-Control": "private, max-age=0, must-revalidate"
        if len(revision) != 40
        else "public, max-age=31536000",
    }
    if entry["lfs"]:
        headers.update(
            {
                "ETag": f'"{entry["sha256"]}"',
                "X-Linked-Etag": f'"{entry["sha256"]}"',
                "X-Linked-Size": str(size),
            }
        )
    else:
        headers["ETag"] = f'"{entry["oid"]}"'
    rng = _parse_range(req.headers.get("Range"), size)
    start, end, status = (0, size, 200) if rng is None else (rng[0], rng[1], 206)
    if status == 206:
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
    stream = None if req.method == "HEAD" else app.storage.objects.iter_range(entry["sha256"], start, end)
    return Response(status, headers, stream=stream if stream is not None else [], length=end - start)

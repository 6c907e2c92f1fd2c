"""Repo-level routes of the embedded Hub: whoami, create/delete/move, settings, listing, repo info
(``model_info`` / ``dataset_info``), refs, branches, tags, commit history, README YAML check.
JSON field names follow the Hub's answers so the client's dataclasses fill in."""

from __future__ import annotations

import contextlib
import json
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from .errors import BadRequest, Conflict, RepoNotFound, Unauthorized
from .httpd import Request, Response, json_response
from .objects import lfs_pointer
from .storage import DEFAULT_BRANCH, REPO_TYPES, RepoKey, make_key

if TYPE_CHECKING:
    from .app import HubApp

COMMITS_PAGE = 100


def _reserved(namespace: str) -> None:
    from .app import RESERVED_NAMESPACES

    if namespace in RESERVED_NAMESPACES:
        raise BadRequest(f"The namespace {namespace!r} is reserved")


def _key_from_body(app: HubApp, req: Request, body: dict) -> RepoKey:
    repo_type = body.get("type") or "model"
    if repo_type not in REPO_TYPES:
        raise BadRequest(f"Invalid repo type {repo_type!r}")
    namespace = body.get("organization") or req.principal.name
    if namespace is None:
        raise Unauthorized("You must be authenticated to manage repositories")
    return make_key(repo_type, namespace, body.get("name") or "")


def whoami(app: HubApp, req: Request) -> Response:
    p = req.principal
    if not req.headers.get("Authorization") or not p.authenticated:
        raise Unauthorized("Invalid credentials in Authorization header")
    return json_response(
        {
            "type": "user",
            "id": p.name,
            "name": p.name,
            "fullname": p.name,
            "email": None,
            "emailVerified": False,
            "isPro": False,
            "canPay": False,
            "avatarUrl": "",
            "orgs": [],
            "auth": {"type": "access_token", "accessToken": {"displayName": p.name, "role": p.role}},
        }
    )


def split_front_matter(text: str) -> str | None:
    """The YAML block between the leading ``---`` lines of a README, or None."""
    lines = text.lstrip("\ufeff").splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for i in range(1, len(lines)):
        if lines[i].strip() == "---":
            return "\n".join(lines[1:i])
    return None


def parse_card_data(text: str) -> dict | None:
    """README YAML -> dict (None without front matter); ValueError on invalid YAML."""
    block = split_front_matter(text)
    if block is None:
        return None
    import yaml

    try:
        data = yaml.safe_load(block)
    except yaml.YAMLError as e:
        raise ValueError(f"Invalid YAML in README.md: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("README.md metadata must be a YAML mapping")
    return data


def validate_yaml(app: HubApp, req: Request) -> Response:
    body = req.json()
    try:
        parse_card_data(str(body.get("content") or ""))
    except ValueError as e:
        return json_response({"errors": [{"message": str(e)}], "warnings": []}, 400)
    return json_response({"errors": [], "warnings": []})


def create(app: HubApp, req: Request) -> Response:
    body = req.json()
    if req.principal.name is None and not body.get("organization"):
        app.auth.require_write(req.principal, "create a repository")
    key = _key_from_body(app, req, body)
    _reserved(key.namespace)
    url = key.url(req.base_url)
    try:
        visible = app.auth.can_read(req.principal, app.storage.meta(key)["private"])
    except RepoNotFound:
        visible = False
    if visible:
        # 409 before the write check, so create_repo(exist_ok=True) works with a read token
        raise Conflict(f"You already created this {key.type} repo: {key.id}", extra={"url": url})
    app.auth.require_write(req.principal, "create a repository")
    private = body.get("private")
    if body.get("visibility") is not None:
        private = body["visibility"] != "public"
    try:
        app.storage.create_repo(key, private=bool(private), author=req.principal.name)
    except Conflict as e:
        e.extra["url"] = url
        raise
    return json_response({"url": url, "name": key.id, "id": key.id})


def delete(app: HubApp, req: Request) -> Response:
    key = _key_from_body(app, req, req.json())
    app.writable(req, key, "delete a repository")
    app.storage.delete_repo(key)
    return json_response({})


def move(app: HubApp, req: Request) -> Response:
    body = req.json()
    repo_type = body.get("type") or "model"
    try:
        (sns, sname), (dns, dname) = (str(body[k]).split("/") for k in ("fromRepo", "toRepo"))
    except (KeyError, ValueError):
        raise BadRequest("Expected 'fromRepo' and 'toRepo' as namespace/name") from None
    src, dst = make_key(repo_type, sns, sname), make_key(repo_type, dns, dname)
    _reserved(dst.namespace)
    app.writable(req, src, "move a repository")
    app.storage.move_repo(src, dst)
    return json_response({"url": dst.url(req.base_url)})


def settings(app: HubApp, req: Request, key: RepoKey) -> Response:
    body = req.json()
    app.writable(req, key, "change repository settings")
    private = body.get("private")
    if body.get("visibility") is not None:
        private = body["visibility"] != "public"
    gated = body.get("gated")
    if gated not in (None, False, "auto", "manual"):
        raise BadRequest(f"Invalid gated value {gated!r}")
    app.storage.update_settings(key, private=private, gated=gated)
    return json_response({})


def _summary(app: HubApp, key: RepoKey, meta: dict, oid: str) -> dict[str, Any]:
    c = app.storage.commit(key, oid)
    out: dict[str, Any] = {
        "_id": meta["created_at"] + "-" + key.id,
        "id": key.id,
        "author": key.namespace,
        "sha": oid,
        "lastModified": c.date,
        "createdAt": meta["created_at"],
        "private": meta["private"],
        "gated": meta.get("gated") or False,
        "disabled": False,
        "downloads": 0,
        "likes": 0,
        "tags": [],
    }
    if key.type == "model":
        out["modelId"] = key.id
    return out


def list_repos(app: HubApp, req: Request, repo_type: str) -> Response:
    author, search = req.arg("author"), (req.arg("search") or "").lower()
    limit = int(req.arg("limit") or 0)
    out = []
    for key in app.storage.list_repos(repo_type):
        if (author and key.namespace != author) or (search and search not in key.id.lower()):
            continue
        try:
            meta = app.storage.meta(key)
            if app.auth.can_read(req.principal, meta["private"]):
                out.append(_summary(app, key, meta, app.storage.resolve(key, None)))
        except RepoNotFound:  # deleted while listing
            continue
    out.sort(key=lambda r: r["lastModified"], reverse=True)
    return json_response(out[:limit] if limit > 0 else out)


def info(app: HubApp, req: Request, key: RepoKey, revision: str | None) -> Response:
    meta = app.readable(req, key)
    oid = app.storage.resolve(key, revision)
    tree = app.storage.commit(key, oid).tree
    out = _summary(app, key, meta, oid)
    blobs = req.flag("blobs")
    siblings = []
    for path in sorted(tree):
        e = tree[path]
        s: dict[str, Any] = {"rfilename": path}
        if blobs:
            s.update(size=e["size"], blobId=e["oid"])
            if e["lfs"]:
                s["lfs"] = {"sha256": e["sha256"], "size": e["size"], "pointerSize": _pointer_size(e)}
        siblings.append(s)
    out["siblings"] = siblings
    out["usedStorage"] = sum(e["size"] for e in tree.values())
    readme = tree.get("README.md")
    if readme is not None and readme["size"] < (1 << 20):
        try:
            card = parse_card_data(app.storage.objects.read(readme["sha256"]).decode("utf-8", "replace"))
        except ValueError:
            card = None
        if card is not None:
            out["cardData"] = card
            tags = card.get("tags") or []
            out["tags"] = [str(t) for t in (tags if isinstance(tags, list) else [tags])]
            for field in ("library_name", "pipeline_tag"):
                if isinstance(card.get(field), str):
                    out[field] = card[field]
    if "config.json" in tree and key.type == "model" and tree["config.json"]["size"] < (1 << 20):
        with contextlib.suppress(ValueError):
            out["config"] = json.loads(app.storage.objects.read(tree["config.json"]["sha256"]))
    return json_response(out)


def _pointer_size(entry: dict) -> int:
    return len(lfs_pointer(entry["sha256"], entry["size"]))


def refs(app: HubApp, req: Request, key: RepoKey) -> Response:
    app.readable(req, key)
    r = app.storage.refs(key)
    branches = sorted(r["heads"], key=lambda b: (b != DEFAULT_BRANCH, b))
    out = {
        "branches": [{"name": b, "ref": f"refs/heads/{b}", "targetCommit": r["heads"][b]} for b in branches],
        "converts": [],
        "tags": [
            {"name": t, "ref": f"refs/tags/{t}", "targetCommit": r["tags"][t]} for t in sorted(r["tags"])
        ],
    }
    if req.flag("include_prs"):
        out["pullRequests"] = [
            {"name": n, "ref": f"refs/pr/{n}", "targetCommit": r["prs"][n]} for n in sorted(r["prs"], key=int)
        ]
    return json_response(out)


def commits(app: HubApp, req: Request, key: RepoKey, revision: str | None) -> Response:
    app.readable(req, key)
    oid = app.storage.resolve(key, revision)
    page = int(req.arg("p") or 0)
    limit = min(max(int(req.arg("limit") or COMMITS_PAGE), 1), 1000)
    out, more = [], False
    for i, c in enumerate(app.storage.history(key, oid)):
        if i < page * limit:
            continue
        if len(out) == limit:
            more = True
            break
        out.append(
            {
                "id": c.id,
                "title": c.title,
                "message": c.message,
                "authors": [{"user": c.author, "avatar": None}],
                "date": c.date,
            }
        )
    headers = {}
    if more:
        rev = quote(revision or DEFAULT_BRANCH, safe="")
        url = f"{req.base_url}/api/{key.type}s/{key.id}/commits/{rev}?p={page + 1}&limit={limit}"
        headers["Link"] = f'<{url}>; rel="next"'
    return json_response(out, headers=headers)


def create_branch(app: HubApp, req: Request, key: RepoKey, branch: str) -> Response:
    body = req.json()
    app.writable(req, key, "create a branch")
    target = app.storage.resolve(key, body.get("startingPoint"))
    app.storage.create_ref(key, "heads", branch, target)
    return json_response({})


def create_tag(app: HubApp, req: Request, key: RepoKey, revision: str) -> Response:
    body = req.json()
    app.writable(req, key, "create a tag")
    if not body.get("tag"):
        raise BadRequest("Missing 'tag'")
    target = app.storage.resolve(key, revision)
    app.storage.create_ref(key, "tags", str(body["tag"]), target)
    return json_response({})


def delete_ref(app: HubApp, req: Request, key: RepoKey, kind: str, name: str) -> Response:
    app.writable(req, key, "delete a branch or tag")
    app.storage.delete_ref(key, kind, name)
    return json_response({})

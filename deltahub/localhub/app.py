"""The embedded Hub application: shared state (storage, tokens, upload-signing key) and the URL
table that maps each Hub route the huggingface_hub client calls to its handler.

Routes (``{T}`` = models | datasets | spaces; ``{P}`` = "" for models, "datasets/", "spaces/"):

    GET    /api/whoami-v2                              GET  /api/{T}?author=&search=&limit=
    POST   /api/repos/create | /api/repos/move         DELETE /api/repos/delete
    POST   /api/validate-yaml
    GET    /api/{T}/{ns}/{name}[/revision/{rev}]       repo info (?blobs=true: sizes, lfs)
    GET    /api/{T}/{ns}/{name}/tree/{rev}[/{path}]    ?recursive=&expand=&cursor=&limit=
    POST   /api/{T}/{ns}/{name}/paths-info/{rev}       form or JSON: paths=..., expand=
    POST   /api/{T}/{ns}/{name}/preupload/{rev}        POST /api/{T}/{ns}/{name}/commit/{rev}
    GET    /api/{T}/{ns}/{name}/refs | /commits/{rev} | /auth-check
    POST|DELETE /api/{T}/{ns}/{name}/branch/{branch}   POST /tag/{rev}, DELETE /tag/{tag}
    PUT    /api/{T}/{ns}/{name}/settings
    POST   /{P}{ns}/{name}.git/info/lfs/objects/batch | /verify
    PUT    /_localhub/lfs/{type}/{ns}/{name}/{oid}     signed upload URL from the batch answer
    GET|HEAD /{P}{ns}/{name}/resolve/{rev}/{path}      Range supported
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import files, repos, upload
from .auth import Auth, Principal
from .errors import GatedRepo, HubError, NotFound, RepoNotFound
from .httpd import Request, Response
from .storage import RepoKey, Storage, make_key

TYPE_OF_PLURAL = {"models": "model", "datasets": "dataset", "spaces": "space"}
RESERVED_NAMESPACES = {
    "api",
    "models",
    "datasets",
    "spaces",
    "_localhub",
    "settings",
    "docs",
    "organizations",
}


@dataclass
class HubApp:
    storage: Storage
    auth: Auth
    secret: bytes = field(default_factory=lambda: os.urandom(32), repr=False)  # signs LFS upload URLs

    def readable(self, req: Request, key: RepoKey, *, download: bool = False) -> dict:
        """Repo metadata if the caller may read it; RepoNotFound otherwise (401 when anonymous,
        404 when authenticated, as the Hub does). ``download`` also enforces gating."""
        try:
            meta = self.storage.meta(key)
        except RepoNotFound:
            raise self._not_found(req.principal, key) from None
        if not self.auth.can_read(req.principal, meta["private"]):
            raise self._not_found(req.principal, key)
        if download and meta.get("gated") and not req.principal.authenticated:
            raise GatedRepo(
                f"Access to {key.type} {key.id} is restricted: log in (pass a token) to download it"
            )
        return meta

    def writable(self, req: Request, key: RepoKey, what: str) -> dict:
        meta = self.readable(req, key)
        self.auth.require_write(req.principal, what)
        return meta

    @staticmethod
    def _not_found(principal: Principal, key: RepoKey) -> HubError:
        return RepoNotFound(
            f"Repository Not Found for {key.type}s/{key.id}", status=404 if principal.authenticated else 401
        )


def dispatch(app: HubApp, req: Request) -> Response:
    """Route one request; raises HubError for anything the client should see as an error."""
    req.principal = app.auth.identify(req.headers.get("Authorization"))
    seg, m = req.segments, req.method
    if seg and seg[-1] == "" and len(seg) > 1:  # tolerate a trailing slash
        seg = seg[:-1]
    if seg[:1] == ["api"]:
        return _api(app, req, seg[1:], m)
    if seg[:2] == ["_localhub", "lfs"] and len(seg) == 6 and m == "PUT":
        return upload.lfs_put(app, req, make_key(seg[2], seg[3], seg[4]), seg[5])
    repo_type = "model"
    if seg and seg[0] in ("datasets", "spaces"):
        repo_type, seg = TYPE_OF_PLURAL[seg[0]], seg[1:]
    if len(seg) == 6 and seg[1].endswith(".git") and seg[2:5] == ["info", "lfs", "objects"] and m == "POST":
        key = make_key(repo_type, seg[0], seg[1][: -len(".git")])
        if seg[5] == "batch":
            return upload.lfs_batch(app, req, key)
        if seg[5] == "verify":
            return upload.lfs_verify(app, req, key)
    if len(seg) >= 5 and seg[2] == "resolve" and m in ("GET", "HEAD"):
        return files.resolve(app, req, make_key(repo_type, seg[0], seg[1]), seg[3], "/".join(seg[4:]))
    raise NotFound(f"No route for {m} /{'/'.join(req.segments)}")


def _api(app: HubApp, req: Request, seg: list[str], m: str) -> Response:
    if seg == ["whoami-v2"] and m == "GET":
        return repos.whoami(app, req)
    if seg == ["validate-yaml"] and m == "POST":
        return repos.validate_yaml(app, req)
    if seg[:1] == ["repos"] and len(seg) == 2:
        action = {
            ("create", "POST"): repos.create,
            ("delete", "DELETE"): repos.delete,
            ("move", "POST"): repos.move,
        }
        if (seg[1], m) in action:
            return action[seg[1], m](app, req)
    if not seg or seg[0] not in TYPE_OF_PLURAL:
        raise NotFound(f"No route for {m} /api/{'/'.join(seg)}")
    repo_type = TYPE_OF_PLURAL[seg[0]]
    if len(seg) == 1 and m == "GET":
        return repos.list_repos(app, req, repo_type)
    if len(seg) < 3:
        raise RepoNotFound(f"Repository Not Found for {'/'.join(seg)}")
    key = make_key(repo_type, seg[1], seg[2])
    rest = seg[3:]
    action, args = (rest[0], rest[1:]) if rest else ("", [])
    if m == "GET":
        if action == "":
            return repos.info(app, req, key, None)
        if action == "revision" and len(args) == 1:
            return repos.info(app, req, key, args[0])
        if action == "tree" and args:
            return files.tree(app, req, key, args[0], "/".join(args[1:]))
        if action == "refs" and not args:
            return repos.refs(app, req, key)
        if action == "commits" and len(args) <= 1:
            return repos.commits(app, req, key, args[0] if args else None)
        if action == "auth-check" and not args:
            app.readable(req, key, download=True)
            return Response(200)
    elif m == "POST":
        if action == "paths-info" and len(args) == 1:
            return files.paths_info(app, req, key, args[0])
        if action == "preupload" and len(args) == 1:
            return upload.preupload(app, req, key, args[0])
        if action == "commit" and len(args) == 1:
            return upload.commit(app, req, key, args[0])
        if action == "branch" and len(args) == 1:
            return repos.create_branch(app, req, key, args[0])
        if action == "tag" and len(args) == 1:
            return repos.create_tag(app, req, key, args[0])
    elif m == "DELETE":
        if action == "branch" and len(args) == 1:
            return repos.delete_ref(app, req, key, "heads", args[0])
        if action == "tag" and len(args) == 1:
            return repos.delete_ref(app, req, key, "tags", args[0])
    elif m == "PUT" and action == "settings" and not args:
        return repos.settings(app, req, key)
    app.readable(req, key)  # an unknown action on a missing repo is a missing repo
    raise NotFound(f"No route for {m} /api/{'/'.join(seg)}")

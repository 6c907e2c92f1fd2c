"""Repositories of the embedded Hub: metadata, refs and immutable commits over the ObjectStore.

Layout under ``root`` (see docs/LOCALHUB.md)::

    objects/ab/cdef...                       file contents by sha256 (objects.py)
    tmp/                                     in-flight writes, renamed into place when complete
    locks/<type>s/<ns>/<name>.lock           one flock per repo, held while refs change
    repos/<type>s/<ns>/<name>/repo.json      {"id", "type", "private", "gated", "created_at"}
    repos/<type>s/<ns>/<name>/refs.json      {"heads": {branch: oid}, "tags": {..}, "prs": {"1": oid}}
    repos/<type>s/<ns>/<name>/commits/<oid>.json
        {"id", "parents": [oid], "title", "message", "author", "date",
         "tree": {path: {"sha256", "size", "lfs": bool, "oid": git blob id}}}
    repos/<type>s/<ns>/<name>/lfs/<sha256>   marker: an LFS object this repo may reference

A commit id is the sha1 of the commit's canonical JSON (40 hex, like git). Refs only change under
the repo lock, by an atomic rename of refs.json, after the new commit file is on disk: a crash
leaves either the old head or the new one, never a dangling ref.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .errors import BadRequest, Conflict, PreconditionFailed, RepoNotFound, RevisionNotFound
from .objects import ObjectStore, atomic_write
from .trees import DEFAULT_GITATTRIBUTES, Op, apply_op, file_entry

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
_NAME_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9_-])?$")
_REF_RE = re.compile(r"^[A-Za-z0-9._/-]{1,200}$")
try:  # process-wide file locks on POSIX; a thread lock per repo elsewhere
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


@dataclass(frozen=True, order=True)
class RepoKey:
    type: str  # "model" | "dataset" | "space"
    namespace: str
    name: str

    @property
    def id(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def rel(self) -> str:
        return f"{self.type}s/{self.namespace}/{self.name}"

    def url(self, base: str) -> str:
        prefix = "" if self.type == "model" else f"{self.type}s/"
        return f"{base}/{prefix}{self.id}"


def check_name(part: str, what: str) -> str:
    if (
        not isinstance(part, str)
        or not _NAME_RE.match(part)
        or ".." in part
        or "--" in part
        or part.endswith(".git")
    ):
        raise BadRequest(f"Invalid {what} {part!r}: use letters, digits, '-', '_', '.' (max 96 chars)")
    return part


def make_key(repo_type: str, namespace: str, name: str) -> RepoKey:
    if repo_type not in REPO_TYPES:
        raise BadRequest(f"Invalid repo type {repo_type!r}, expected one of {REPO_TYPES}")
    return RepoKey(repo_type, check_name(namespace, "namespace"), check_name(name, "repo name"))


def check_ref_name(name: str) -> str:
    if (
        not _REF_RE.match(name)
        or ".." in name
        or name.startswith(("/", "refs/"))
        or name.endswith(("/", ".lock"))
    ):
        raise BadRequest(f"Invalid branch or tag name {name!r}")
    if COMMIT_RE.match(name):
        raise BadRequest(f"A branch or tag name cannot look like a commit id: {name!r}")
    return name


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Commit:
    id: str
    parents: list[str]
    title: str
    message: str
    author: str
    date: str
    tree: dict[str, dict]


class Storage:
    """All repos under one root. Safe for many threads and for several processes on one root."""

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()
        self.objects = ObjectStore(self.root)
        (self.root / "repos").mkdir(parents=True, exist_ok=True)
        (self.root / "locks").mkdir(parents=True, exist_ok=True)
        self._commit_cache: OrderedDict[tuple[str, str], Commit] = OrderedDict()
        self._cache_lock = threading.Lock()
        self._thread_locks: dict[str, threading.Lock] = {}

    # ----------------------------------------------------------------- repos
    def repo_dir(self, key: RepoKey) -> Path:
        return self.root / "repos" / key.rel

    @contextlib.contextmanager
    def lock(self, key: RepoKey) -> Iterator[None]:
        path = self.root / "locks" / f"{key.rel}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        if fcntl is None:  # pragma: no cover
            with self._cache_lock:
                tl = self._thread_locks.setdefault(str(path), threading.Lock())
            with tl:
                yield
            return
        with open(path, "a+b") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def meta(self, key: RepoKey) -> dict:
        try:
            return json.loads((self.repo_dir(key) / "repo.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise RepoNotFound(f"Repository {key.type}s/{key.id} not found") from None

    def exists(self, key: RepoKey) -> bool:
        return (self.repo_dir(key) / "repo.json").is_file()

    def list_repos(self, repo_type: str) -> list[RepoKey]:
        base = self.root / "repos" / f"{repo_type}s"
        if not base.is_dir():
            return []
        return sorted(
            RepoKey(repo_type, ns.name, repo.name)
            for ns in base.iterdir()
            if ns.is_dir()
            for repo in ns.iterdir()
            if (repo / "repo.json").is_file()
        )

    def create_repo(self, key: RepoKey, *, private: bool, author: str) -> Commit:
        """Create a repo with an initial commit holding ``.gitattributes`` (like the Hub).
        Atomic: built in tmp/ and renamed; raises Conflict if it already exists."""
        final = self.repo_dir(key)
        if self.exists(key):
            raise Conflict(f"You already created this {key.type} repo: {key.id}")
        staging = self.objects.tmp / f"repo-{uuid.uuid4().hex}"
        (staging / "commits").mkdir(parents=True)
        (staging / "lfs").mkdir()
        try:
            data = DEFAULT_GITATTRIBUTES.encode()
            sha = self.objects.put_bytes(data)
            tree = {".gitattributes": file_entry(sha, len(data), False, data)}
            commit = self._make_commit([], tree, "initial commit", "", author)
            (staging / "commits" / f"{commit.id}.json").write_text(json.dumps(commit.__dict__))
            created = now_iso()
            meta = {
                "id": key.id,
                "type": key.type,
                "private": bool(private),
                "gated": False,
                "created_at": created,
            }
            (staging / "repo.json").write_text(json.dumps(meta))
            (staging / "refs.json").write_text(
                json.dumps({"heads": {DEFAULT_BRANCH: commit.id}, "tags": {}, "prs": {}})
            )
            final.parent.mkdir(parents=True, exist_ok=True)
            self.objects.sync()  # the staged files are durable before the rename publishes them
            with self.lock(key):
                if self.exists(key):
                    raise Conflict(f"You already created this {key.type} repo: {key.id}")
                if final.exists():  # an empty leftover directory
                    shutil.rmtree(final)
                os.rename(staging, final)
            return commit
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)

    def delete_repo(self, key: RepoKey) -> None:
        with self.lock(key):
            self.meta(key)
            trash = self.objects.tmp / f"deleted-{uuid.uuid4().hex}"
            os.rename(self.repo_dir(key), trash)
        shutil.rmtree(trash, ignore_errors=True)

    def move_repo(self, src: RepoKey, dst: RepoKey) -> None:
        first, second = sorted([src, dst], key=lambda k: k.rel)
        with self.lock(first), self.lock(second):
            meta = self.meta(src)
            if self.exists(dst):
                raise Conflict(f"Repository {dst.id} already exists")
            target = self.repo_dir(dst)
            target.parent.mkdir(parents=True, exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            os.rename(self.repo_dir(src), target)
            meta["id"] = dst.id
            atomic_write(target / "repo.json", json.dumps(meta).encode(), self.objects.tmp)

    def update_settings(
        self, key: RepoKey, *, private: bool | None = None, gated: str | bool | None = None
    ) -> None:
        with self.lock(key):
            meta = self.meta(key)
            if private is not None:
                meta["private"] = bool(private)
            if gated is not None:
                meta["gated"] = gated
            atomic_write(self.repo_dir(key) / "repo.json", json.dumps(meta).encode(), self.objects.tmp)

    # ------------------------------------------------------------------ refs
    def refs(self, key: RepoKey) -> dict:
        try:
            return json.loads((self.repo_dir(key) / "refs.json").read_text())
        except FileNotFoundError:
            raise RepoNotFound(f"Repository {key.type}s/{key.id} not found") from None

    def _write_refs(self, key: RepoKey, refs: dict) -> None:
        atomic_write(self.repo_dir(key) / "refs.json", json.dumps(refs).encode(), self.objects.tmp)

    def resolve(self, key: RepoKey, revision: str | None) -> str:
        """Branch, tag, ``refs/heads|tags|pr/..`` or full commit id -> commit id."""
        rev = revision or DEFAULT_BRANCH
        refs = self.refs(key)
        if rev.startswith("refs/heads/"):
            oid = refs["heads"].get(rev[len("refs/heads/") :])
        elif rev.startswith("refs/tags/"):
            oid = refs["tags"].get(rev[len("refs/tags/") :])
        elif rev.startswith("refs/pr/"):
            oid = refs["prs"].get(rev[len("refs/pr/") :])
        else:
            oid = refs["heads"].get(rev) or refs["tags"].get(rev)
            if (
                oid is None
                and COMMIT_RE.match(rev)
                and (self.repo_dir(key) / "commits" / f"{rev}.json").is_file()
            ):
                oid = rev
        if oid is None:
            raise RevisionNotFound(f"Invalid rev id: {rev}")
        return oid

    def _branch_ref(self, rev: str | None) -> tuple[str, str]:
        """A revision one may commit to -> ("heads", name) or ("prs", num)."""
        rev = rev or DEFAULT_BRANCH
        if rev.startswith("refs/pr/"):
            return "prs", rev[len("refs/pr/") :]
        return "heads", rev[len("refs/heads/") :] if rev.startswith("refs/heads/") else rev

    def create_ref(self, key: RepoKey, kind: str, name: str, target: str) -> None:
        """kind "heads" (branch) or "tags"; raises Conflict when it exists."""
        check_ref_name(name)
        with self.lock(key):
            refs = self.refs(key)
            if name in refs[kind]:
                raise Conflict(f"{'Branch' if kind == 'heads' else 'Tag'} {name!r} already exists")
            refs[kind][name] = target
            self._write_refs(key, refs)

    def delete_ref(self, key: RepoKey, kind: str, name: str) -> None:
        with self.lock(key):
            refs = self.refs(key)
            if name not in refs[kind]:
                raise RevisionNotFound(f"Invalid rev id: {name}")
            if kind == "heads" and name == DEFAULT_BRANCH:
                raise BadRequest(f"Cannot delete the default branch {DEFAULT_BRANCH!r}")
            del refs[kind][name]
            self._write_refs(key, refs)

    # --------------------------------------------------------------- commits
    def _make_commit(self, parents: list[str], tree: dict, title: str, message: str, author: str) -> Commit:
        body = {"parents": parents, "title": title, "message": message, "author": author, "date": now_iso()}
        canon = json.dumps({**body, "tree": tree}, sort_keys=True, separators=(",", ":")).encode()
        return Commit(id=hashlib.sha1(canon).hexdigest(), tree=tree, **body)

    def commit(self, key: RepoKey, oid: str) -> Commit:
        ck = (key.rel, oid)
        with self._cache_lock:
            if ck in self._commit_cache:
                self._commit_cache.move_to_end(ck)
                return self._commit_cache[ck]
        try:
            c = Commit(**json.loads((self.repo_dir(key) / "commits" / f"{oid}.json").read_text()))
        except FileNotFoundError:
            raise RevisionNotFound(f"Invalid rev id: {oid}") from None
        with self._cache_lock:
            self._commit_cache[ck] = c
            while len(self._commit_cache) > 256:
                self._commit_cache.popitem(last=False)
        return c

    def history(self, key: RepoKey, oid: str) -> Iterator[Commit]:
        """The commit and its first-parent ancestors, newest first."""
        while oid:
            c = self.commit(key, oid)
            yield c
            oid = c.parents[0] if c.parents else ""

    def add_lfs_marker(self, key: RepoKey, sha256: str) -> None:
        marker = self.repo_dir(key) / "lfs" / sha256
        try:  # no parents=True: a repo deleted meanwhile must not come back as a husk
            marker.parent.mkdir(exist_ok=True)
            marker.touch()
        except FileNotFoundError:
            raise RepoNotFound(f"Repository {key.type}s/{key.id} not found") from None

    def has_lfs(self, key: RepoKey, sha256: str, size: int | None = None) -> bool:
        return (self.repo_dir(key) / "lfs" / sha256).exists() and self.objects.has(sha256, size)

    def apply_commit(
        self,
        key: RepoKey,
        revision: str | None,
        ops: list[Op],
        *,
        title: str,
        message: str = "",
        author: str,
        parent_commit: str | None = None,
        create_pr: bool = False,
    ) -> tuple[Commit, str | None]:
        """Apply ``ops`` on top of the branch head under the repo lock; returns (commit, pr number).

        With ``parent_commit`` the commit lands only if it is still the head (412 otherwise): two
        writers that both read head H and commit with parent H cannot both succeed. Without it the
        ops apply to whatever the head is at lock time, so concurrent commits all land."""
        kind, name = self._branch_ref(revision)
        with self.lock(key):
            self.meta(key)  # raises RepoNotFound if the repo was deleted meanwhile
            refs = self.refs(key)
            head = refs[kind].get(name)
            if head is None:
                if kind == "heads" and name not in refs["tags"] and not COMMIT_RE.match(name):
                    raise RevisionNotFound(f"Invalid rev id: {revision}")
                raise BadRequest(f"Can only commit to a branch, not to {revision!r}")
            if parent_commit is not None and parent_commit != head:
                raise PreconditionFailed(
                    f"A commit has happened since {parent_commit}: the head of {name!r} is now {head}."
                    " Please refresh and try again."
                )
            tree = dict(self.commit(key, head).tree)
            for op in ops:
                apply_op(tree, op)
            commit = self._make_commit([head], tree, title, message, author)
            atomic_write(
                self.repo_dir(key) / "commits" / f"{commit.id}.json",
                json.dumps(commit.__dict__).encode(),
                self.objects.tmp,
            )
            pr = None
            if create_pr:
                pr = str(1 + max((int(n) for n in refs["prs"]), default=0))
                refs["prs"][pr] = commit.id
            else:
                refs[kind][name] = commit.id
            self._write_refs(key, refs)
        return commit, pr

    # ----------------------------------------------------------------- trees

    def gitattributes(self, key: RepoKey, oid: str) -> str:
        """The text of ``.gitattributes`` at commit ``oid`` ("" if absent)."""
        entry = self.commit(key, oid).tree.get(".gitattributes")
        return "" if entry is None else self.objects.read(entry["sha256"]).decode("utf-8", "replace")

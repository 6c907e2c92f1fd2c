"""Trees of the embedded Hub: a commit's tree is a flat dict ``path -> entry`` with entries
``{"sha256", "size", "lfs": bool, "oid": git blob id}``. Path validation, folder listing, the
operations a commit applies, and the LFS-or-regular decision for new files."""

from __future__ import annotations

import fnmatch
import hashlib

from .errors import BadRequest, EntryNotFound
from .objects import git_blob_oid, lfs_pointer

LFS_THRESHOLD = 10 * 1024 * 1024  # files above this are always LFS, like on the Hub
_LFS_PATTERNS = (  # tracked by git-lfs in a new repo's .gitattributes, as on the Hub
    "*.7z *.arrow *.bin *.bz2 *.ckpt *.ftz *.gguf *.gz *.h5 *.joblib *.lz4 *.mlmodel *.model *.msgpack"
    " *.npy *.npz *.onnx *.ot *.parquet *.pb *.pickle *.pkl *.pt *.pth *.rar *.safetensors"
    " saved_model/**/* *.tar.* *.tar *.tflite *.tgz *.wasm *.xz *.zip *.zst *tfevents*"
)
DEFAULT_GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in _LFS_PATTERNS.split())


def check_path(path: str) -> str:
    """A file path inside a repo: relative, '/'-separated, no '.', '..', empty or '.git' segment."""
    if not isinstance(path, str) or not path or len(path) > 1024:
        raise BadRequest(f"Invalid path in repo: {path!r}")
    if path.startswith("/") or "\\" in path or "\0" in path or any(ord(c) < 32 for c in path):
        raise BadRequest(f"Invalid path in repo (absolute or control characters): {path!r}")
    if any(seg in ("", ".", "..", ".git") for seg in path.split("/")):
        raise BadRequest(f"Invalid path in repo (empty, '.', '..' or '.git' segment): {path!r}")
    return path


# An operation of a commit, already validated: ("add", path, entry) | ("delete_file", path)
# | ("delete_folder", path).  Entries are {"sha256", "size", "lfs", "oid"}.
Op = tuple


def file_entry(sha256: str, size: int, lfs: bool, content: bytes | None = None) -> dict:
    """Tree entry of a file; ``content`` is needed for the git blob id of a regular file."""
    oid = git_blob_oid(lfs_pointer(sha256, size) if lfs else content if content is not None else b"")
    return {"sha256": sha256, "size": size, "lfs": lfs, "oid": oid}


def apply_op(tree: dict, op: Op) -> None:
    kind, path = op[0], op[1]
    if kind == "add":
        if any(p.startswith(path + "/") for p in tree):
            raise BadRequest(f"Cannot add file {path!r}: a folder with this name exists")
        parts = path.split("/")
        for i in range(1, len(parts)):
            if "/".join(parts[:i]) in tree:
                raise BadRequest(f"Cannot add file {path!r}: {'/'.join(parts[:i])!r} is a file")
        tree[path] = op[2]
    elif kind == "delete_file":
        if path not in tree:
            raise EntryNotFound(f"A file with this name doesn't exist: {path}")
        del tree[path]
    elif kind == "delete_folder":
        prefix = path.rstrip("/") + "/"
        doomed = [p for p in tree if p.startswith(prefix)]
        if not doomed:
            raise EntryNotFound(f"A folder with this name doesn't exist: {path}")
        for p in doomed:
            del tree[p]
    else:  # pragma: no cover - routes build ops
        raise AssertionError(kind)


def list_tree(tree: dict, path: str, recursive: bool) -> list[tuple[str, dict | None]]:
    """Entries under folder ``path`` ("" = root): (path, file entry) for files, (path, None) for
    folders; direct children only unless ``recursive``. Folders first, then files, by path."""
    prefix = path.rstrip("/") + "/" if path else ""
    folders: set[str] = set()
    files: list[tuple[str, dict | None]] = []
    for p, entry in tree.items():
        if not p.startswith(prefix):
            continue
        rest = p[len(prefix) :].split("/")
        for i in range(1, len(rest) if recursive else min(len(rest), 2)):
            folders.add(prefix + "/".join(rest[:i]))
        if recursive or len(rest) == 1:
            files.append((p, entry))
    return [(f, None) for f in sorted(folders)] + sorted(files, key=lambda t: t[0])


def folder_oid(tree: dict, path: str) -> str:
    """A stable id for a folder's content (sha1 over its files' paths and blob ids)."""
    prefix = path.rstrip("/") + "/"
    h = hashlib.sha1()
    for p in sorted(p for p in tree if p.startswith(prefix)):
        h.update(f"{p[len(prefix) :]}\0{tree[p]['oid']}\n".encode())
    return h.hexdigest()


def is_folder(tree: dict, path: str) -> bool:
    prefix = path.rstrip("/") + "/"
    return any(p.startswith(prefix) for p in tree)


def lfs_patterns(gitattributes: str) -> list[str]:
    """Patterns marked ``filter=lfs`` in a .gitattributes text."""
    return [line.split()[0] for line in gitattributes.splitlines() if "filter=lfs" in line.split()[1:]]


def upload_mode(gitattributes: str, path: str, size: int, sample: bytes) -> str:
    """ "lfs" for files over 10 MiB, binary ones (a NUL in the first 512 bytes) and those the
    repo's .gitattributes tracks with LFS; "regular" otherwise and for empty files (like the Hub)."""
    if size == 0:
        return "regular"
    if size > LFS_THRESHOLD or b"\0" in sample:
        return "lfs"
    base = path.rsplit("/", 1)[-1]
    for pat in lfs_patterns(gitattributes):
        if fnmatch.fnmatchcase(path if "/" in pat else base, pat.lstrip("/")):
            return "lfs"
    return "regular"

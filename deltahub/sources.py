"""Resolve a model argument (local folder, or Hub repo id with optional ``@revision``) to a local
folder. The one function every command uses to find a base, a fine-tune or a delta."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from deltahub.errors import ModelSourceError


@dataclass(frozen=True)
class ResolvedModel:
    """A model available on local disk: ``path``; ``id`` as the user named it (repo id or path)
    and ``revision`` (commit sha for Hub repos, None for plain folders)."""

    path: Path
    id: str
    revision: str | None = None
    is_local: bool = True


def split_revision(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; a plain ref has revision None."""
    if "@" in ref and not os.path.exists(ref):
        name, rev = ref.rsplit("@", 1)
        return name, rev or None
    return ref, None


def resolve_model(ref: str | os.PathLike, *, revision: str | None = None, token: str | None = None,
                  kind: str = "model") -> ResolvedModel:
    """A local folder as is; otherwise a Hub repo id, downloaded through deltahub.hub.

    ``kind`` is "model" (weights needed) or "delta" (a deltahub delta repo).
    """
    ref = os.fspath(ref)
    p = Path(ref).expanduser()
    if p.is_dir():
        return ResolvedModel(p.resolve(), ref, None, True)
    if p.exists():
        raise ModelSourceError(f"{ref} is a file; expected a model folder or a Hub repo id")
    name, rev = split_revision(ref)
    if ref.startswith((".", "/", "~")) or name.count("/") > 1 or not name:
        raise ModelSourceError(f"{ref}: no such folder, and not a Hub repo id")
    from deltahub import hub

    return hub.resolve_repo(name, revision=revision or rev, token=token, kind=kind)

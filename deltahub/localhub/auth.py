"""Tokens and permissions of the embedded Hub.

Token spec (``--token`` on the command line, one per line in ``--token-file``)::

    USER:ROLE:SECRET    e.g. alice:write:hf_alice   (ROLE is ``read`` or ``write``)
    USER:SECRET         same as USER:write:SECRET
    SECRET              same as local:write:SECRET

Rules (the server is one trust domain; scopes separate reading from writing):

- no token configured (open mode): every request, with or without a token, acts as user
  ``local`` with write access;
- tokens configured: anonymous requests may read public repos only; any configured token
  (read or write) may read every repo, private ones included; creating, committing, deleting,
  branching and changing settings need a ``write`` token; an unknown token is answered
  ``401 Invalid credentials in Authorization header`` like the Hub does.
"""

from __future__ import annotations

import hmac
import os
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from deltahub.errors import DeltahubError

from .errors import Forbidden, Unauthorized

ROLES = ("read", "write")
OPEN_USER = "local"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


@dataclass(frozen=True)
class Token:
    user: str
    role: str  # "read" | "write"
    secret: str

    def __repr__(self) -> str:  # never print secrets
        return f"Token(user={self.user!r}, role={self.role!r})"


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: ``name`` None for anonymous; ``role`` "none", "read" or "write"."""

    name: str | None
    role: str

    @property
    def can_write(self) -> bool:
        return self.role == "write"

    @property
    def authenticated(self) -> bool:
        return self.name is not None


def parse_token(spec: str | Token) -> Token:
    """``USER:ROLE:SECRET`` / ``USER:SECRET`` / ``SECRET`` -> Token (see the module docstring)."""
    if isinstance(spec, Token):
        return spec
    parts = spec.strip().split(":")
    if len(parts) == 1:
        user, role, secret = OPEN_USER, "write", parts[0]
    elif len(parts) == 2:
        user, role, secret = parts[0], "write", parts[1]
    elif len(parts) == 3:
        user, role, secret = parts
    else:
        raise DeltahubError(f"bad token spec {spec!r}: expected USER:ROLE:SECRET, USER:SECRET or SECRET")
    if role not in ROLES:
        raise DeltahubError(f"bad token spec for user {user!r}: role must be one of {ROLES}, got {role!r}")
    if not _NAME_RE.match(user):
        raise DeltahubError(f"bad token spec: invalid user name {user!r}")
    if not secret or any(c.isspace() for c in secret):
        raise DeltahubError(f"bad token spec for user {user!r}: empty secret or secret with whitespace")
    return Token(user, role, secret)


def read_token_file(path: str) -> list[Token]:
    """One token spec per line; blank lines and ``#`` comments are skipped."""
    with open(path, encoding="utf-8") as f:
        return [parse_token(line) for line in f if line.strip() and not line.lstrip().startswith("#")]


class Auth:
    """Maps an ``Authorization`` header to a Principal and checks read/write permissions."""

    def __init__(self, tokens: Iterable[str | Token] = ()):
        self.tokens = [parse_token(t) for t in tokens]
        secrets = [t.secret for t in self.tokens]
        if len(set(secrets)) != len(secrets):
            raise DeltahubError("the same token secret is given twice")

    @property
    def open(self) -> bool:
        return not self.tokens

    def identify(self, authorization: str | None) -> Principal:
        if self.open:
            return Principal(OPEN_USER, "write")
        if not authorization:
            return Principal(None, "none")
        scheme, _, secret = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not secret.strip():
            raise Unauthorized("Invalid credentials in Authorization header")
        secret = secret.strip()
        for tok in self.tokens:
            if hmac.compare_digest(tok.secret.encode(), secret.encode()):
                return Principal(tok.user, tok.role)
        raise Unauthorized("Invalid credentials in Authorization header")

    @staticmethod
    def can_read(principal: Principal, private: bool) -> bool:
        return not private or principal.authenticated

    @staticmethod
    def require_write(principal: Principal, what: str) -> None:
        if principal.can_write:
            return
        if not principal.authenticated:
            raise Unauthorized(f"You must be authenticated with a write token to {what}")
        raise Forbidden(f"Your token has read access only: it cannot {what}")


def load_signing_key(path: Path) -> bytes:
    """The key that signs LFS upload URLs, created once per storage root (mode 0600) so URLs stay
    valid across restarts and across several servers sharing the root."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        pass
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(secrets.token_bytes(32))
    try:
        os.link(tmp, path)  # fails if another process created it first: then use theirs
    except FileExistsError:
        pass
    finally:
        tmp.unlink()
    return path.read_bytes()

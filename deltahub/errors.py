"""Typed errors. Every user mistake raises a DeltahubError subclass; the CLI prints its message
on one line and exits non-zero (DELTAHUB_DEBUG=1 shows the traceback)."""

from __future__ import annotations


class DeltahubError(Exception):
    """Base class for errors caused by input the user can fix."""


class DeltaFormatError(DeltahubError):
    """A delta folder is truncated, corrupted, of an unknown version or otherwise unreadable."""


class ShapeMismatchError(DeltahubError):
    """Base and fine-tune (or base and delta) disagree on architecture, names or shapes."""


class BaseMismatchError(DeltahubError):
    """A delta is applied over a base whose weights differ from the one it was made for."""


class CodecError(DeltahubError):
    """Unknown codec or invalid codec settings."""


class ModelSourceError(DeltahubError):
    """A model argument cannot be resolved: missing folder, pickle-only weights, unknown repo."""


class RemoteServerError(DeltahubError):
    """A deltahub (or TGI/OpenAI-compatible) server refused or failed a request over HTTP.

    ``kind``: "unavailable" (unreachable or 503), "unknown_variant", "overloaded" (429), "auth"
    (401/403), "validation" (400/422), "generation" (424, 5xx or an error event mid-stream)."""

    def __init__(self, message: str, *, kind: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.status = status


class HubError(DeltahubError):
    """The Hub refused or failed a request: authentication, permissions, network, upload."""


class UsageError(DeltahubError):
    """An option value is invalid or unusable here (e.g. ``--device cuda`` without CUDA)."""

"""HTTP-level errors of the embedded Hub. Each carries the status code and the ``X-Error-Code``
header the huggingface_hub client maps to its own exception types
(RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, GatedRepoError, ...)."""

from __future__ import annotations

from deltahub.errors import DeltahubError


class HubError(DeltahubError):
    """An error answered to the client as ``status`` + ``{"error": message}`` (+ ``X-Error-Code``)."""

    status = 500
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})  # more fields of the JSON error body (e.g. "url" on 409)


class BadRequest(HubError):
    status = 400


class Unauthorized(HubError):
    status = 401


class Forbidden(HubError):
    status = 403


class RepoNotFound(HubError):
    status = 404
    code = "RepoNotFound"


class RevisionNotFound(HubError):
    status = 404
    code = "RevisionNotFound"


class EntryNotFound(HubError):
    status = 404
    code = "EntryNotFound"


class GatedRepo(HubError):
    status = 401
    code = "GatedRepo"


class NotFound(HubError):
    status = 404


class Conflict(HubError):
    status = 409


class PreconditionFailed(HubError):
    """parentCommit is not the head of the branch any more (someone else committed first)."""

    status = 412


class RangeNotSatisfiable(HubError):
    status = 416


class PayloadError(HubError):
    """An LFS upload whose bytes do not match the announced oid/size."""

    status = 422

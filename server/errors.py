"""Typed errors of the serving engine (all DeltahubError subclasses, so the CLI prints one line)."""

from __future__ import annotations

from deltahub.errors import DeltahubError


class UnknownVariantError(DeltahubError):
    """A request names a variant that is neither registered nor loadable (dynamic loading off)."""


class VariantLoadError(DeltahubError):
    """A variant could not be loaded (missing, corrupted, wrong base, unsupported); only the
    requests that need it fail."""


class RequestValidationError(DeltahubError):
    """A request's prompt or sampling parameters are invalid (empty prompt, too long, bad range)."""


class EngineOverloadedError(DeltahubError):
    """The waiting queue is full; the caller should retry later (HTTP 429)."""


class EngineDeadError(DeltahubError):
    """The engine loop stopped after an unexpected error; the server is unhealthy (HTTP 503)."""


class EngineConfigError(DeltahubError):
    """An engine setting is invalid (non-positive sizes, unknown names, unusable device)."""

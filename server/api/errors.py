"""HTTP errors: one exception type, two wire shapes.

TGI routes answer ``{"error": str, "error_type": str}`` with TGI's status codes (422 validation,
424 generation, 429 overloaded, 503 unhealthy); ``/v1/*`` routes answer OpenAI's
``{"error": {"message", "type", "param", "code"}}``. Malformed JSON is 400, a wrong content type
415, an unknown route 404: never 500 for something the client sent.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError as FastAPIValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deltahub.errors import DeltahubError

log = logging.getLogger("deltahub.server.api")

# TGI error_type for a status, when the raiser did not choose one.
_TGI_TYPES = {400: "validation", 401: "authentication", 404: "not_found", 405: "method_not_allowed",
              413: "validation", 415: "validation", 422: "validation", 424: "generation",
              429: "overloaded", 500: "internal", 503: "unhealthy"}
# OpenAI error.type for a status.
_OPENAI_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                 422: "invalid_request_error", 424: "server_error", 429: "rate_limit_error",
                 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error with its HTTP status. ``error_type`` is TGI's field; ``param``/``code`` OpenAI's.
    On /v1 routes a TGI validation status 422 becomes OpenAI's 400 unless ``openai_status`` says."""

    def __init__(self, status: int, message: str, *, error_type: str | None = None,
                 param: str | None = None, code: str | None = None, openai_status: int | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_type = error_type or _TGI_TYPES.get(status, "error")
        self.param = param
        self.code = code
        self.openai_status = openai_status or (400 if status == 422 else status)
        self.headers = headers


def validation(message: str, *, param: str | None = None, code: str | None = None) -> ApiError:
    """TGI's 422: the message carries TGI's 'Input validation error: ' prefix."""
    return ApiError(422, f"Input validation error: {message}", error_type="validation", param=param,
                    code=code)


def unknown_variant(name: str, known: list[str]) -> ApiError:
    listed = ", ".join(repr(k) for k in known) or "none"
    return ApiError(422, f"Unknown variant {name!r}: this server serves the base model and the variants "
                    f"{listed} (GET /v1/models lists them)", error_type="validation", param="model",
                    code="model_not_found", openai_status=404)


def is_openai_path(path: str) -> bool:
    return path.startswith("/v1/")


def error_body(err: ApiError, openai: bool) -> dict:
    if openai:
        etype = _OPENAI_TYPES.get(err.openai_status, "server_error")
        return {"error": {"message": err.message, "type": etype, "param": err.param,
                          "code": err.code or err.error_type}}
    return {"error": err.message, "error_type": err.error_type}


def error_response(err: ApiError, path: str) -> JSONResponse:
    openai = is_openai_path(path)
    return JSONResponse(error_body(err, openai), status_code=err.openai_status if openai else err.status,
                        headers=err.headers)


def from_engine_error(exc: BaseException) -> ApiError:
    """Map the engine's typed errors (server/errors.py) to HTTP; anything else is a 424/500."""
    from deltahub.server import errors as engine_errors

    name = type(exc).__name__
    msg = str(exc) or name
    if isinstance(exc, ApiError):
        return exc
    if isinstance(exc, getattr(engine_errors, "UnknownVariantError", ())):
        return ApiError(422, msg, error_type="validation", param="model", code="model_not_found",
                        openai_status=404)
    if isinstance(exc, getattr(engine_errors, "RequestValidationError", ())):
        return validation(msg)
    if isinstance(exc, getattr(engine_errors, "EngineOverloadedError", ())):
        return ApiError(429, "Model is overloaded", error_type="overloaded", code="overloaded")
    if isinstance(exc, getattr(engine_errors, "EngineDeadError", ())):
        return ApiError(503, f"Engine unavailable: {msg}", error_type="unhealthy", code="engine_dead")
    if isinstance(exc, getattr(engine_errors, "VariantLoadError", ())):
        return ApiError(424, f"Request failed during generation: {msg}", error_type="generation",
                        code="variant_load_error")
    if isinstance(exc, DeltahubError):
        return ApiError(424, f"Request failed during generation: {msg}", error_type="generation")
    log.error("unexpected engine failure: %s: %s", name, msg, exc_info=exc)
    return ApiError(500, f"Request failed during generation: {name}: {msg}", error_type="generation")


def _pydantic_message(errors: list[dict]) -> tuple[str, str | None]:
    """'parameters.temperature: Input should be a valid number' from pydantic's error list."""
    parts, param = [], None
    for e in errors[:3]:
        loc = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        param = param or (loc or None)
        parts.append(f"{loc}: {e.get('msg', 'invalid')}" if loc else e.get("msg", "invalid"))
    return "; ".join(parts), param


def pydantic_error(exc) -> ApiError:
    """A pydantic ValidationError (wrong type, missing field, unknown enum) -> 422."""
    msg, param = _pydantic_message(exc.errors(include_url=False, include_input=False))
    return validation(msg, param=param)


def install(app: FastAPI) -> None:
    """Register the handlers that turn every failure into the route's error shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return error_response(exc, request.url.path)

    @app.exception_handler(DeltahubError)
    async def _engine_error(request: Request, exc: DeltahubError):
        return error_response(from_engine_error(exc), request.url.path)

    @app.exception_handler(FastAPIValidationError)
    async def _fastapi_validation(request: Request, exc: FastAPIValidationError):
        msg, param = _pydantic_message(list(exc.errors()))
        return error_response(validation(msg, param=param), request.url.path)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        return error_response(ApiError(exc.status_code, detail, headers=getattr(exc, "headers", None)),
                              request.url.path)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("unhandled error on %s: %s", request.url.path, exc, exc_info=exc)
        return error_response(ApiError(500, f"Internal server error: {type(exc).__name__}",
                                       error_type="internal"), request.url.path)

"""The FastAPI app factory: ``create_app(engine, api_key=..., ...)``.

Routes: TGI's (tgi.py), OpenAI's (openai.py), run-time variants (variants.py). With ``api_key``
every route except ``GET /health`` needs ``Authorization: Bearer <key>`` (compared in constant
time; the key is never logged). Serve with any ASGI server, e.g. ``uvicorn.run(app)``.
"""

from __future__ import annotations

import hmac

from deltahub.server.api import errors, openai, tgi, variants
from deltahub.server.api.errors import ApiError
from deltahub.server.api.generation import Server, ServerConfig
from deltahub.server.api.validation import Limits
from fastapi import Depends, FastAPI, Request

from deltahub import __version__


def _auth_dependency(api_key: str | None):
    expected = api_key.encode() if api_key else None

    async def check(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected):
            raise ApiError(401, "Missing or invalid API key: send `Authorization: Bearer <key>`",
                           error_type="authentication", code="invalid_api_key",
                           headers={"www-authenticate": "Bearer"})

    return check


def _engine_facts(engine) -> dict:
    probe = getattr(engine, "info", None)
    return dict(probe() or {}) if callable(probe) else {}


def _engine_max_len(engine) -> int | None:
    """The engine's longest prompt + generation: ``info()["max_total_tokens"]`` or its config."""
    value = _engine_facts(engine).get("max_total_tokens")
    value = value or getattr(getattr(engine, "config", None), "max_model_len", None)
    return int(value) if value else None


def create_app(engine, *, api_key: str | None = None, model_id: str | None = None,
               max_input_tokens: int | None = None, max_total_tokens: int | None = None,
               max_stop_sequences: int = 4, max_best_of: int = 2, max_top_n_tokens: int = 5,
               max_client_batch_size: int = 4, max_concurrent_requests: int = 128,
               dynamic_variants: bool | None = None, compute_type: str | None = None) -> FastAPI:
    """Wrap a running ``AsyncLLM``. Limits default from the engine: ``max_total_tokens`` = its
    longest sequence (``max_model_len``), ``max_input_tokens`` = that minus one;
    ``dynamic_variants`` (requests may name a Hub id not yet served) = the engine's
    ``dynamic_loading``; ``model_id`` = the engine's base id."""
    total = max_total_tokens or _engine_max_len(engine) or 2048
    limits = Limits(max_best_of=max_best_of, max_stop_sequences=max_stop_sequences,
                    max_top_n_tokens=max_top_n_tokens, max_input_tokens=max_input_tokens or max(total - 1, 1),
                    max_total_tokens=total, max_client_batch_size=max_client_batch_size)
    cfg = getattr(engine, "config", None)
    if dynamic_variants is None:
        dynamic_variants = bool(getattr(cfg, "dynamic_loading", False))
    device = str(getattr(cfg, "device", "cpu") or "cpu")
    config = ServerConfig(
        model_id=model_id or str(_engine_facts(engine).get("model_id") or "base"), api_key=api_key,
        limits=limits,
        max_concurrent_requests=max_concurrent_requests, dynamic_variants=dynamic_variants,
        compute_type=compute_type or ("gpu+optimized" if device.startswith("cuda") else device),
        version=__version__)

    app = FastAPI(title="deltahub", version=__version__,
                  description="A base model and many fine-tune deltas behind TGI- and OpenAI-compatible "
                              "routes.")
    app.state.server = Server(engine, config)
    errors.install(app)
    auth = [Depends(_auth_dependency(api_key))]
    app.include_router(tgi.health_router)
    app.include_router(tgi.router, dependencies=auth)
    app.include_router(openai.router, dependencies=auth)
    app.include_router(variants.router, dependencies=auth)
    return app

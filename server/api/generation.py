"""The bridge between routes and ``AsyncLLM``: variant resolution, tokenization, limits, timing,
metrics and abort-on-disconnect, shared by the TGI and OpenAI routes.

A ``Job`` is one engine request: ``prompt_ids`` [P] token ids, ``params`` SamplingParams, ``variant``
the engine's name (None = base). ``Server.stream(job)`` yields the engine's RequestOutputs and
always aborts the engine request if the consumer stops early (client gone, error, cancel).
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from deltahub.server.api import errors, facts
from deltahub.server.api.errors import ApiError
from deltahub.server.api.metrics import Metrics
from deltahub.server.api.validation import Limits

log = logging.getLogger("deltahub.server.api")
_counter = itertools.count()
BASE_ALIASES = ("", "tgi", "base")


@dataclass
class ServerConfig:
    """Settings of the HTTP layer (the engine has its own EngineConfig)."""

    model_id: str = "base"
    api_key: str | None = None
    limits: Limits = field(default_factory=Limits)
    max_concurrent_requests: int = 128
    dynamic_variants: bool = False
    compute_type: str = "cpu"
    version: str = "0"


@dataclass
class Job:
    prompt_ids: list[int]
    params: Any  # deltahub.server.sampling.SamplingParams
    variant: str | None
    label: str  # the variant's public name (the base's model id for the base)
    request_id: str = field(default_factory=lambda: f"req-{next(_counter)}-{uuid.uuid4().hex[:8]}")
    started: float = field(default_factory=time.monotonic)  # request arrival at the HTTP layer
    submitted: float = 0.0  # handed to the engine


@dataclass
class Timing:
    """TGI's timing split, seconds."""

    total: float
    validation: float
    queue: float
    inference: float
    generated_tokens: int

    @property
    def per_token(self) -> float:
        return self.inference / max(self.generated_tokens, 1)

    def headers(self, compute_type: str, prompt_tokens: int, label: str, characters: int) -> dict[str, str]:
        ms = lambda s: str(int(s * 1000))  # noqa: E731
        return {"x-compute-type": compute_type, "x-compute-time": f"{self.total:.6f}",
                "x-compute-characters": str(characters), "x-total-time": ms(self.total),
                "x-validation-time": ms(self.validation), "x-queue-time": ms(self.queue),
                "x-inference-time": ms(self.inference), "x-time-per-token": ms(self.per_token),
                "x-prompt-tokens": str(prompt_tokens), "x-generated-tokens": str(self.generated_tokens),
                "x-adapter-id": label}


class Server:
    """Holds the engine, the config and the metrics; one per app."""

    def __init__(self, engine, config: ServerConfig):
        self.engine = engine
        self.config = config
        self.metrics = Metrics(self.engine_stats)
        self.in_flight = 0
        self._load_locks: dict[str, asyncio.Lock] = {}
        self._pending: set[asyncio.Future] = set()
        self._codecs: dict[tuple, Any] = {}
        self._base_ref: str | None = None

    # ------------------------------------------------------------------ engine views
    def engine_stats(self) -> dict:
        try:
            return dict(self.engine.stats() or {})
        except Exception as e:  # a scrape must not fail because the engine is down
            log.warning("engine.stats() failed: %s", e)
            return {}

    def engine_info(self) -> dict:
        probe = getattr(self.engine, "info", None)
        try:
            return dict(probe() or {}) if callable(probe) else {}
        except Exception as e:
            log.warning("engine.info() failed: %s", e)
            return {}

    def codec_of(self, v) -> dict | str | None:
        return facts.codec_of(self.engine, v, self._codecs)

    def kind_of(self, v) -> str:
        return facts.kind_of(self.engine, v)

    def variants(self) -> list[Any]:
        return list(self.engine.variants())

    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants()]

    def healthy(self) -> bool:
        probe = getattr(self.engine, "is_healthy", None) or getattr(self.engine, "healthy", None)
        if probe is None:
            return True
        return bool(probe() if callable(probe) else probe)

    # ------------------------------------------------------------------ variants
    def is_base(self, name: str | None) -> bool:
        """None, "", "tgi", "base", the served model id or the engine's base reference."""
        if name is None or name in BASE_ALIASES or name == self.config.model_id:
            return True
        if self._base_ref is None:
            self._base_ref = str(self.engine_info().get("model_id") or "")
        return name == self._base_ref

    async def resolve(self, name: str | None, *, source: str | None = None) -> tuple[str | None, str]:
        """A public variant name -> (engine variant or None for the base, label). Unknown names
        raise a 422/404 naming them, unless dynamic loading is on and the name is a Hub id
        (``adapter_source`` "hub", the default) or a folder (``adapter_source`` "local")."""
        if source not in (None, "hub", "local"):
            raise errors.validation(f"`adapter_source` {source!r} is not supported (use 'hub' or 'local')",
                                    param="adapter_source")
        if self.is_base(name):
            return None, self.config.model_id
        known = self.variant_names()
        if name in known:
            return name, name
        if not self.config.dynamic_variants:
            raise errors.unknown_variant(name, known)
        if source != "local" and "/" not in name:
            raise errors.unknown_variant(name, known)
        await self.add_variant(name, name)
        return name, name

    async def add_variant(self, name: str, ref: str, kind: str | None = None) -> None:
        lock = self._load_locks.setdefault(name, asyncio.Lock())
        async with lock:
            if name in self.variant_names():
                return
            await _call(self.engine.add_variant, name, ref, kind=kind)

    async def remove_variant(self, name: str) -> None:
        await _call(self.engine.remove_variant, name)

    # ------------------------------------------------------------------ tokenization
    def tokenizer(self, variant: str | None):
        return self.engine.tokenizer(variant)

    def encode(self, variant: str | None, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer(variant)(text, add_special_tokens=add_special_tokens)["input_ids"])

    def chat_prompt(self, variant: str | None, messages: list[dict]) -> str:
        tok = self.tokenizer(variant)
        if not getattr(tok, "chat_template", None):
            raise ApiError(422, "Template error: this model has no chat template; use /v1/completions",
                           error_type="template_error", param="messages")
        try:
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja errors from a user-supplied conversation
            raise ApiError(422, f"Template error: {e}", error_type="template_error", param="messages") from e

    # ------------------------------------------------------------------ running
    def admit(self) -> None:
        """TGI's concurrency limit: beyond it, 429 at once."""
        if self.in_flight >= self.config.max_concurrent_requests:
            self.metrics.request_failed("overloaded")
            raise ApiError(429, "Model is overloaded", error_type="overloaded", code="overloaded")

    async def open(self, job: Job) -> Opened:
        """Submit ``job``. Refusals by the engine (validation, unknown variant, queue full) raise
        an ApiError here, before any byte of the response is sent."""
        self.admit()
        self.in_flight += 1
        self.metrics.in_flight = self.in_flight
        self.metrics.request_received(job.label)
        self.metrics.input_length.observe(len(job.prompt_ids))
        self.metrics.max_new_tokens.observe(job.params.max_new_tokens)
        opened = Opened(self, job)
        try:
            job.submitted = time.monotonic()
            kw = {"prompt_token_ids": job.prompt_ids, "params": job.params, "variant": job.variant}
            add = getattr(self.engine, "add_request", None)
            if add is not None and inspect.iscoroutinefunction(add):
                opened.source = await add(job.request_id, **kw)
            else:
                opened.source = self.engine.generate(job.request_id, **kw)
        except BaseException as e:
            opened.fail(e)
            opened.release()
            if isinstance(e, Exception):
                raise opened.error from e
            raise
        return opened

    async def stream(self, job: Job) -> AsyncIterator[Any]:
        """Yield the RequestOutputs of ``job``; the engine request is aborted unless it finished."""
        opened = await self.open(job)
        try:
            async for out in opened.outputs():
                yield out
        finally:
            await opened.aclose()

    async def run(self, job: Job) -> Any:
        """The final RequestOutput of ``job``."""
        last = None
        async for out in self.stream(job):
            last = out
        return last

    async def watched(self, request, coro):
        """Await ``coro`` unless the client disconnects first (then cancel it: its engine requests
        are aborted and their KV blocks freed)."""
        task = asyncio.ensure_future(coro)
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
                raise ApiError(499, "Client closed the request", error_type="cancelled")
        return task.result()

    def abort(self, request_id: str) -> None:
        try:
            res = self.engine.abort(request_id)
            if inspect.isawaitable(res):
                self._pending.add(task := asyncio.ensure_future(res))
                task.add_done_callback(self._pending.discard)
        except Exception as e:  # already finished / unknown id
            log.debug("abort(%s): %s", request_id, e)

    def timing(self, job: Job, out) -> Timing:
        total = time.monotonic() - job.started
        validation = max(job.submitted - job.started, 0.0)
        queue = float(getattr(out, "queue_time", 0.0) or 0.0)
        inference = float(getattr(out, "inference_time", 0.0) or 0.0)
        return Timing(total=total, validation=validation, queue=queue, inference=inference,
                      generated_tokens=len(out.token_ids))


class Opened:
    """A submitted engine request. ``outputs()`` yields its RequestOutputs (engine failures become
    ApiErrors); ``release()`` (idempotent, also run by ``aclose``) frees the concurrency slot and
    aborts the engine request if it has not finished: safe to call from a response's background
    task in case the response body was never iterated."""

    def __init__(self, server: Server, job: Job):
        self.server, self.job = server, job
        self.source: Any = None
        self.finished = False
        self.released = False
        self.error: ApiError | None = None

    def fail(self, exc: BaseException) -> None:
        if isinstance(exc, ApiError):
            self.error = exc
        elif isinstance(exc, Exception):
            self.error = errors.from_engine_error(exc)
        else:  # cancelled: the client went away
            self.error = ApiError(499, "Client closed the request", error_type="cancelled")
        self.server.metrics.request_failed(self.error.error_type)

    async def outputs(self) -> AsyncIterator[Any]:
        srv, job, sent = self.server, self.job, 0
        try:
            async for out in self.source:
                if out.error:
                    raise _output_error(out)
                n = len(out.token_ids)
                if n > sent:
                    srv.metrics.tokens_generated(job.label, n - sent)
                    sent = n
                self.finished = bool(out.finished)
                if self.finished:
                    t = srv.timing(job, out)
                    srv.metrics.request_succeeded(job.label, total=t.total, validation=t.validation,
                                                  queue=t.queue, inference=t.inference,
                                                  generated_tokens=t.generated_tokens)
                yield out
                if self.finished:
                    return
            raise ApiError(500, "Incomplete generation", error_type="incomplete_generation")
        except BaseException as e:
            if not self.finished and self.error is None:
                self.fail(e)
            if isinstance(e, Exception) and self.error is not None and e is not self.error:
                raise self.error from e
            raise
        finally:
            self.release()

    async def aclose(self) -> None:
        self.release()
        await _aclose(self.source)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        srv = self.server
        srv.in_flight -= 1
        srv.metrics.in_flight = srv.in_flight
        if not self.finished:
            srv.abort(self.job.request_id)


def _output_error(out) -> ApiError:
    kind = (out.error_type or "").lower()
    msg = out.error or "generation failed"
    if "overload" in kind:
        return ApiError(429, "Model is overloaded", error_type="overloaded", code="overloaded")
    if "validation" in kind:
        return errors.validation(msg)
    if "unknown" in kind:
        return ApiError(422, msg, error_type="validation", param="model", code="model_not_found",
                        openai_status=404)
    return ApiError(424, f"Request failed during generation: {msg}", error_type="generation",
                    code=kind or None)


async def _disconnected(request) -> None:
    """Return when the client of ``request`` (body already read) goes away."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _call(fn, *args, **kw):
    """Call an engine method that may be sync (run in a thread: it may load weights) or async."""
    if inspect.iscoroutinefunction(fn):
        return await fn(*args, **kw)
    res = await asyncio.to_thread(fn, *args, **kw)
    return await res if inspect.isawaitable(res) else res


async def _aclose(agen) -> None:
    close = getattr(agen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception as e:
            log.debug("closing engine stream: %s", e)

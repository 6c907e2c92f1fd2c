"""AsyncLLM: the engine loop in a background thread, streamed to asyncio callers.

Callers talk to the loop through a command queue (add, abort, variant admin); the loop pushes
each request's outputs into that request's asyncio.Queue with ``call_soon_threadsafe``.
``stats()`` / ``variants()`` read a snapshot the loop refreshes after every iteration, so they
never block.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from deltahub.server.config import EngineConfig, parse_variant_specs
from deltahub.server.delta_cache import VariantInfo
from deltahub.server.engine import Engine
from deltahub.server.errors import EngineDeadError, VariantLoadError
from deltahub.server.sampling import SamplingParams
from deltahub.server.sequence import RequestOutput

log = logging.getLogger(__name__)
_ids = itertools.count()


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)


class AsyncLLM:
    """Build with the same arguments as LLM (or ``from_engine`` / ``from_cli_args``); loading the
    base happens in the constructor, then the loop thread starts."""

    def __init__(
        self,
        base: str | None = None,
        variants: dict[str, str] | None = None,
        config: EngineConfig | None = None,
        *,
        engine: Engine | None = None,
        **kwargs,
    ) -> None:
        if engine is None:
            if base is None:
                raise ValueError("AsyncLLM needs a base model (or an engine)")
            config = config or EngineConfig.from_kwargs(**kwargs)
            engine = Engine(str(base), variants, config)
        self.engine = engine
        self.config = engine.config
        self._cmds: queue.Queue = queue.Queue()
        self._streams: dict[str, _Stream] = {}
        self._stop = threading.Event()
        self._dead: BaseException | None = None
        self._snapshot: tuple[list[VariantInfo], dict[str, Any]] = ([], {})
        self._refresh()
        self._thread = threading.Thread(target=self._loop, name="deltahub-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_cli_args(
        cls,
        base: str,
        variants: list[str] | dict[str, str] | None = None,
        *,
        max_gpu_variants: int = 4,
        max_host_variants: int = 8,
        device: str = "cpu",
        dtype: str | None = None,
        dynamic_loading: bool = False,
        **kwargs,
    ) -> AsyncLLM:
        """For ``deltahub serve``: ``variants`` as ["NAME=REF", ...] (or a dict); other keyword
        arguments are EngineConfig fields."""
        specs = variants if isinstance(variants, dict) else parse_variant_specs(variants)
        config = EngineConfig.from_kwargs(
            device=device,
            dtype=dtype,
            max_gpu_variants=max_gpu_variants,
            max_host_variants=max_host_variants,
            dynamic_loading=dynamic_loading,
            **kwargs,
        )
        return cls(base, specs, config)

    # -- the loop thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        eng = self.engine
        try:
            while not self._stop.is_set():
                busy = eng.has_unfinished()
                try:
                    cmd = self._cmds.get(timeout=0.05) if not busy else self._cmds.get_nowait()
                except queue.Empty:
                    cmd = None
                while cmd is not None:
                    self._run_cmd(cmd)
                    try:
                        cmd = self._cmds.get_nowait()
                    except queue.Empty:
                        cmd = None
                if eng.has_unfinished() or any(e.future is not None for e in eng.cache.entries.values()):
                    outs = eng.step()
                    for out in outs:
                        self._emit(out)
                    if not outs:
                        time.sleep(0.002)  # only waiting for a variant load
                self._refresh()
        except BaseException as e:  # the engine is broken: fail everyone, refuse new work
            log.exception("engine loop died")
            self._dead = e
            for rid in list(self._streams):
                self._emit_error(rid, EngineDeadError(f"engine stopped: {type(e).__name__}: {e}"))

    def _run_cmd(
        self, cmd: tuple[Callable[[], Any], asyncio.Future | None, asyncio.AbstractEventLoop | None]
    ) -> None:
        fn, fut, loop = cmd
        try:
            res, exc = fn(), None
        except Exception as e:
            res, exc = None, e
        self._refresh()
        if fut is not None and loop is not None:
            loop.call_soon_threadsafe(_resolve, fut, res, exc)

    def _emit(self, out: RequestOutput) -> None:
        st = self._streams.get(out.request_id)
        if st is None:
            return
        if out.finished:
            self._streams.pop(out.request_id, None)
        st.loop.call_soon_threadsafe(st.queue.put_nowait, out)

    def _emit_error(self, rid: str, exc: Exception) -> None:
        st = self._streams.pop(rid, None)
        if st is not None:
            st.loop.call_soon_threadsafe(st.queue.put_nowait, exc)

    def _refresh(self) -> None:
        self._snapshot = (self.engine.variants(), self.engine.stats())

    async def _call(self, fn: Callable[[], Any]) -> Any:
        if self._dead is not None or self._stop.is_set():
            raise EngineDeadError("the engine is not running")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._cmds.put((fn, fut, loop))
        return await fut

    # -- requests -----------------------------------------------------------------------------------
    async def add_request(
        self,
        request_id: str | None = None,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        variant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Validate and queue a request; raises RequestValidationError, UnknownVariantError or
        EngineOverloadedError at once. Returns the stream of its outputs (see ``generate``)."""
        rid = request_id or f"req-{next(_ids)}"
        st = _Stream(asyncio.get_running_loop())

        def add() -> None:
            self.engine.add_request(rid, prompt, params, variant, prompt_token_ids=prompt_token_ids)
            self._streams[rid] = st

        await self._call(add)
        return self._iterate(rid, st)

    async def _iterate(self, rid: str, st: _Stream) -> AsyncIterator[RequestOutput]:
        finished = False
        try:
            while True:
                item = await st.queue.get()
                if isinstance(item, Exception):
                    raise item
                if item.finished:
                    finished = True
                    if item.finish_reason == "error":
                        if item.error_type == "VariantLoadError":
                            raise VariantLoadError(item.error or "variant load failed")
                        raise EngineDeadError(item.error or "generation failed")
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self.abort(rid)

    async def generate(
        self,
        request_id: str | None = None,
        prompt: str | None = None,
        prompt_token_ids: list[int] | None = None,
        params: SamplingParams | None = None,
        variant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream a request: each RequestOutput carries the new token ids / text since the last one
        (and everything so far); the last has ``finished`` and ``finish_reason``. Closing the
        iterator early aborts the request and frees its KV blocks."""
        stream = await self.add_request(request_id, prompt, prompt_token_ids, params, variant)
        async for out in stream:
            yield out

    def abort(self, request_id: str) -> None:
        """Stop a request (no-op if unknown or finished); callable from any thread."""

        def do() -> None:
            self.engine.abort(request_id)
            self._streams.pop(request_id, None)

        self._cmds.put((do, None, None))

    # -- variants and introspection -------------------------------------------------------------------
    def tokenizer(self, variant: str | None = None):
        return self.engine.tokenizer(variant)

    def variants(self) -> list[VariantInfo]:
        return list(self._snapshot[0])

    def stats(self) -> dict[str, Any]:
        return dict(self._snapshot[1])

    def info(self) -> dict[str, Any]:
        return self.engine.info()

    @property
    def healthy(self) -> bool:
        return self._dead is None and self._thread.is_alive()

    async def add_variant(
        self, name: str, ref: str, kind: str | None = None, *, wait: bool = True, timeout: float = 600.0
    ) -> VariantInfo:
        """Register a variant and start loading it; with ``wait``, return once it is in memory
        (raises VariantLoadError, and forgets it, if the load fails)."""

        def add() -> None:
            self.engine.add_variant(name, str(ref), kind)
            self.engine.preload(name)

        await self._call(add)
        deadline = time.monotonic() + timeout
        while wait:
            info = next((v for v in self.variants() if v.name == name), None)
            if info is not None and info.tier == "failed":
                await self.remove_variant(name)
                raise VariantLoadError(info.error or f"variant {name!r} failed to load")
            if info is not None and info.tier not in ("disk", "loading"):
                return info
            if time.monotonic() > deadline:
                raise VariantLoadError(f"variant {name!r} did not load within {timeout:.0f} s")
            await asyncio.sleep(0.02)
        return await self._call(lambda: self.engine.cache.info(name))

    async def remove_variant(self, name: str) -> None:
        await self._call(lambda: self.engine.remove_variant(name))

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.engine.shutdown()


def _resolve(fut: asyncio.Future, res: Any, exc: Exception | None) -> None:
    if fut.done():
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(res)

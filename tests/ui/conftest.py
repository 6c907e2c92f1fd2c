"""The real deltahub server for the playground's tests: ``create_app`` over ``AsyncLLM`` on the
toy base with three compressed toy fine-tunes, served by uvicorn in a thread on a free port."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

VARIANTS = ("upper", "pirate", "reverse")  # reverse is left cold for test_cold_variant_becomes_warm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Uvicorn:
    """An ASGI app on 127.0.0.1:<free port> in a daemon thread."""

    def __init__(self, app, port: int | None = None) -> None:
        import uvicorn

        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class LiveServer:
    url: str
    engine: object
    base: str  # the base's public name (/info model_id)
    variants: list[str]  # warm-able variants the tests chat with (distinct tasks)
    cold_variant: str  # never requested before test_cold_variant_becomes_warm
    _extra: list[_Uvicorn] = field(default_factory=list)

    def running(self) -> int:
        """Requests the engine holds (running + waiting)."""
        s = self.engine.stats()
        return int(s.get("running", 0)) + int(s.get("queue_size", 0))

    @contextlib.contextmanager
    def slow_steps(self, seconds: float):
        """Each engine step takes ``seconds`` longer (a bigger model's pace), so that a test can act
        while a reply is still being generated."""
        eng = self.engine.engine
        step = eng.step

        def slow():
            time.sleep(seconds)
            return step()

        eng.step = slow
        try:
            yield
        finally:
            del eng.step  # the class's method again

    def serve(self, make_app) -> str:
        """Serve ``make_app(url)`` (an ASGI app that may need its own URL) on a free port; its URL."""
        port = _free_port()
        srv = _Uvicorn(make_app(f"http://127.0.0.1:{port}"), port)
        self._extra.append(srv)
        return srv.url

    def extra_app(self, **create_app_kwargs) -> str:
        """Another app over the same engine (e.g. with an API key); returns its URL."""
        from deltahub.server.api.app import create_app

        return self.serve(lambda _url: create_app(self.engine, model_id=self.base, **create_app_kwargs))


@pytest.fixture(scope="session")
def ui_deltas(toy_deltas) -> dict[str, Path]:
    """{task: delta folder} of the toy fine-tunes the playground tests serve."""
    return {t: toy_deltas[t] for t in VARIANTS}


@pytest.fixture(scope="session")
def ui_server(toy_models, ui_deltas):
    from deltahub.server.api.app import create_app
    from deltahub.server.async_llm import AsyncLLM

    engine = AsyncLLM(base=str(toy_models["base"]), variants={t: str(p) for t, p in ui_deltas.items()},
                      device="cpu", max_gpu_variants=4)
    main = _Uvicorn(create_app(engine, model_id="toy-base"))
    live = LiveServer(url=main.url, engine=engine, base="toy-base", variants=["upper", "pirate"],
                      cold_variant="reverse")
    yield live
    for srv in [main, *live._extra]:
        srv.stop()
    engine.shutdown()

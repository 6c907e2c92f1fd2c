"""The real deltahub server for the playground's tests: ``create_app`` over ``AsyncLLM`` on the
toy base with three compressed toy fine-tunes, served by uvicorn in a thread on a free port."""

from __future__ import annotations

import contextlib
import os
import shutil
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


def _cached(root: Path, name: str, make) -> Path:
    target = root / name
    if not target.exists():
        tmp = root / f"{name}.tmp{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        make(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another run got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return target


@pytest.fixture(scope="session")
def ui_deltas(toy_models, tmp_path_factory) -> dict[str, Path]:
    """{task: delta folder} of the toy fine-tunes (RTN 4-bit 2:4), cached like the engine tests'."""
    from deltahub.compress import CompressConfig, compress

    cache = os.environ.get("DELTAHUB_TOY_CACHE")
    root = Path(cache) / "engine-tests" if cache else tmp_path_factory.mktemp("ui-deltas")
    root.mkdir(parents=True, exist_ok=True)
    cfg = CompressConfig(method="rtn", bits=4, sparsity="2:4")
    return {t: _cached(root, f"delta-{t}",
                       lambda p, t=t: compress(toy_models["base"], toy_models[t], p, cfg, progress=False))
            for t in VARIANTS}


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

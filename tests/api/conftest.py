"""The HTTP API's fixtures: the real engine (AsyncLLM on the toy models: three compressed deltas and a
PEFT LoRA adapter) behind ``create_app``, served by uvicorn in a thread on a free port."""

from __future__ import annotations

import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ..conftest import cached

DELTAS = ("upper", "reverse", "double")
MAX_MODEL_LEN = 512  # the toy model's max_position_embeddings


@pytest.fixture(scope="session")
def api_artifacts(tmp_path_factory) -> Path:
    cache = os.environ.get("DELTAHUB_TOY_CACHE")
    root = Path(cache) / "api-tests" if cache else tmp_path_factory.mktemp("api")
    root.mkdir(parents=True, exist_ok=True)
    return root


def _make_lora(base: Path, out: Path) -> None:
    """A PEFT LoRA adapter of the toy base with random (non-zero) A and B: untrained, so cheap, but
    it changes the model's answers, which is all these tests need."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(r=8, lora_alpha=64, lora_dropout=0.0, init_lora_weights=False,
                     target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
    get_peft_model(model, cfg).save_pretrained(str(out))


@pytest.fixture(scope="session")
def api_variants(toy_models, toy_deltas, api_artifacts) -> dict[str, Path]:
    """{"upper", "reverse", "double": delta folders (RTN 4-bit 2:4), "lora": a PEFT LoRA adapter}."""
    out = {t: toy_deltas[t] for t in DELTAS}
    out["lora"] = cached(api_artifacts, "lora-random", lambda p: _make_lora(toy_models["base"], p))
    return out


@dataclass
class Live:
    url: str
    engine: object
    app: object
    server: object
    thread: threading.Thread

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app) -> tuple[object, threading.Thread, str]:
    """Run ``app`` with uvicorn in a daemon thread; returns (server, thread, base url) once it listens."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", timeout_graceful_shutdown=5)
    )
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}"


@pytest.fixture(scope="session")
def engine(toy_models, api_variants):
    from deltahub.server.async_llm import AsyncLLM

    variants = {t: str(api_variants[t]) for t in DELTAS} | {"lora": str(api_variants["lora"])}
    eng = AsyncLLM(
        str(toy_models["base"]),
        variants=variants,
        device="cpu",
        max_model_len=MAX_MODEL_LEN,
        max_gpu_variants=2,
        max_num_seqs=32,
    )
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def live(engine):
    """The API on the shared engine (no API key)."""
    from deltahub.server.api.app import create_app

    app = create_app(engine, model_id="toy-base")
    server, thread, url = serve(app)
    handle = Live(url, engine, app, server, thread)
    yield handle
    handle.stop()

"""The playground's HTTP client against the real deltahub server (server.api on the engine, toy
models): listing variants from /v1/models + /info, SSE chat streaming, timing, cold/warm, abort
on close, and the mapping of every server error the UI must show."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from deltahub.errors import RemoteServerError
from deltahub.playground_client import (
    PlaygroundClient,
    SamplingSettings,
    error_from_response,
    parse_variants,
)

GREEDY = SamplingSettings(temperature=0.0, max_tokens=24)
HELLO = [{"role": "user", "content": "hello world again"}]


def _run(coro):
    return asyncio.run(coro)


async def _collect(client: PlaygroundClient, variant: str, messages=HELLO, settings=GREEDY, **kw):
    text, last, chunks = "", None, 0
    async for delta, stats in client.stream_chat(variant, messages, settings, **kw):
        text += delta
        chunks += bool(delta)
        last = stats
    return text, last, chunks


def _plain_reply(url: str, variant: str, messages=HELLO, max_tokens: int = 24, **headers) -> dict:
    body = {"model": variant, "messages": messages, "temperature": 0, "max_tokens": max_tokens}
    r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=60)
    r.raise_for_status()
    return r.json()


def test_variants_come_from_models_and_info(ui_server):
    cards = _run(PlaygroundClient(ui_server.url).variants())
    models = httpx.get(f"{ui_server.url}/v1/models").json()
    info = httpx.get(f"{ui_server.url}/info").json()
    names = [c.name for c in cards]
    assert set(names) == {m["id"] for m in models["data"]}
    assert names[0] == info["model_id"] and cards[0].kind == "base" and cards[0].warm is True
    by_name = {c.name: c for c in cards}
    for v in info["variants"]:
        card = by_name[v["name"]]
        assert (card.kind, card.source, card.tier) == (v["kind"], v["source"], v["tier"])
        assert card.bytes == v["bytes"] and card.warm == (v["tier"] == "gpu")
        assert card.label().startswith(f"{v['name']} · {v['kind']}" if v["kind"] else v["name"])
        assert ("warm" if card.warm else "cold") in card.label()
        assert card.row()[0] == v["name"] and len(card.row()) == 7
    assert set(ui_server.variants) <= set(names)


def test_stream_matches_plain_reply_and_variants_differ(ui_server):
    client = PlaygroundClient(ui_server.url)
    texts = {}
    for name in ui_server.variants[:2]:
        text, stats, chunks = _run(_collect(client, name))
        plain = _plain_reply(ui_server.url, name)
        assert text == plain["choices"][0]["message"]["content"] and text
        assert stats.tokens == plain["usage"]["completion_tokens"]
        assert chunks >= 2 and stats.finish_reason in ("stop", "length")
        assert 0 < stats.first_token_s <= stats.elapsed_s and stats.tokens_per_s > 0
        texts[name] = text
    assert len(set(texts.values())) == 2, texts


def test_system_prompt_and_sampling_reach_the_server(ui_server):
    client = PlaygroundClient(ui_server.url)
    name = ui_server.variants[0]
    settings = SamplingSettings(temperature=0.0, max_tokens=3, system_prompt="be short")
    text, stats, _ = _run(_collect(client, name, settings=settings))
    messages = [{"role": "system", "content": "be short"}, *HELLO]
    plain = _plain_reply(ui_server.url, name, messages, max_tokens=3)
    assert text == plain["choices"][0]["message"]["content"]
    assert stats.tokens <= 3
    body = client.chat_body(name, HELLO, SamplingSettings(temperature=0.5, top_p=0.9, max_tokens=7))
    assert body["temperature"] == 0.5 and body["top_p"] == 0.9 and body["max_tokens"] == 7
    assert body["stream"] is True and "top_p" not in client.chat_body(name, HELLO, GREEDY)


def test_cold_variant_becomes_warm(ui_server):
    client = PlaygroundClient(ui_server.url)
    cold = next(c for c in _run(client.variants()) if c.name == ui_server.cold_variant)
    assert cold.warm is False, cold
    _, stats, _ = _run(_collect(client, cold.name, cold=not cold.warm))
    assert stats.cold is True and "cold (loaded)" in stats.summary()
    after = next(c for c in _run(client.variants()) if c.name == cold.name)
    assert after.warm is True and after.tier == "gpu"


def test_closing_the_stream_aborts_on_the_server(ui_server):
    # The toy base was trained on prose only: greedy, it never ends a chat turn by itself.
    client = PlaygroundClient(ui_server.url)
    before = ui_server.engine.stats()["base"]["generated_tokens"]

    async def open_then_close():
        agen = client.stream_chat(ui_server.base, HELLO, SamplingSettings(temperature=0.0, max_tokens=480))
        await agen.__anext__()
        assert ui_server.running() == 1
        await agen.aclose()

    with ui_server.slow_steps(0.005):
        _run(open_then_close())
    deadline = time.monotonic() + 5
    while ui_server.running() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert ui_server.running() == 0
    assert ui_server.engine.stats()["base"]["generated_tokens"] - before < 480


def test_unknown_variant_is_named(ui_server):
    with pytest.raises(RemoteServerError) as e:
        _run(_collect(PlaygroundClient(ui_server.url), "no-such-variant"))
    assert e.value.kind == "unknown_variant" and e.value.status == 404
    assert "no-such-variant" in str(e.value) and "HTTP 404" in str(e.value)


def test_invalid_parameters_are_validation_errors(ui_server):
    bad = SamplingSettings(temperature=-1.0, max_tokens=4)
    with pytest.raises(RemoteServerError) as e:
        _run(_collect(PlaygroundClient(ui_server.url), ui_server.variants[0], settings=bad))
    assert e.value.kind == "validation" and e.value.status == 400 and "temperature" in str(e.value)


def test_server_down():
    with pytest.raises(RemoteServerError) as e:
        _run(PlaygroundClient("http://127.0.0.1:9").variants())
    assert e.value.kind == "unavailable" and "127.0.0.1:9" in str(e.value)
    with pytest.raises(RemoteServerError) as e:
        _run(_collect(PlaygroundClient("http://127.0.0.1:9"), "x"))
    assert e.value.kind == "unavailable"


def test_api_key(ui_server):
    url = ui_server.extra_app(api_key="s3cret")
    with pytest.raises(RemoteServerError) as e:
        _run(PlaygroundClient(url).variants())
    assert e.value.kind == "auth" and e.value.status == 401
    with pytest.raises(RemoteServerError) as e:
        _run(PlaygroundClient(url, api_key="wrong").variants())
    assert e.value.kind == "auth"
    client = PlaygroundClient(url, api_key="s3cret")
    assert set(ui_server.variants) <= {c.name for c in _run(client.variants())}
    text, _, _ = _run(_collect(client, ui_server.variants[0]))
    assert text


def test_overloaded(ui_server):
    url = ui_server.extra_app(max_concurrent_requests=1)
    client = PlaygroundClient(url)

    async def two_at_once():
        first = client.stream_chat(ui_server.base, HELLO, SamplingSettings(temperature=0.0, max_tokens=480))
        await first.__anext__()  # in flight now
        try:
            with pytest.raises(RemoteServerError) as e:
                await _collect(client, ui_server.variants[1])
        finally:
            await first.aclose()
        return e.value

    with ui_server.slow_steps(0.005):
        err = _run(two_at_once())
    assert err.kind == "overloaded" and err.status == 429 and "overloaded" in str(err).lower()


# -- wire shapes the client must read, seen on other deployments (TGI, FastAPI, plain OpenAI)


def test_error_shapes():
    tgi = error_from_response(422, json.dumps({"error": "Input validation error: `temperature` must be "
                                                        "strictly positive", "error_type": "validation"}))
    assert tgi.kind == "validation" and "temperature" in str(tgi)
    openai_404 = error_from_response(404, json.dumps({"error": {"message": "The model `x` does not exist.",
                                                                "type": "invalid_request_error",
                                                                "code": "model_not_found"}}), variant="x")
    assert openai_404.kind == "unknown_variant" and "Unknown variant 'x'" in str(openai_404)
    assert error_from_response(429, b'{"error": "Model is overloaded", "error_type": "overloaded"}').kind \
        == "overloaded"
    assert error_from_response(503, b"<html>bad gateway</html>").kind == "unavailable"
    assert error_from_response(500, b"").kind == "generation"
    fastapi = error_from_response(422, json.dumps({"detail": [{"msg": "field required"}]}))
    assert "field required" in str(fastapi)


def test_variants_without_info_and_with_codec_dicts():
    models = {"data": [{"id": "b"}, {"id": "v1"}]}
    plain = parse_variants(models, None)
    assert [(c.name, c.warm) for c in plain] == [("b", None), ("v1", None)]
    info = {"model_id": "b", "variants": [{"name": "v1", "kind": "delta", "tier": "host", "bytes": 2_500_000,
                                           "codec": {"name": "obs", "bits": 4, "sparsity": "2:4"}}]}
    base, v1 = parse_variants(models, info)
    assert base.kind == "base" and base.warm is True
    assert v1.label() == "v1 · delta · obs 4-bit 2:4 · 2.5 MB · cold"


def test_error_event_mid_stream():
    from deltahub.playground_client import ReplyStats

    stats = ReplyStats(variant="v")
    chunk = json.dumps({"choices": [{"delta": {"content": "hi"}}]})
    assert PlaygroundClient._apply_chunk(chunk, stats, "v") == "hi" and stats.tokens == 1
    with pytest.raises(RemoteServerError) as e:
        PlaygroundClient._apply_chunk(json.dumps({"error": "CUDA out of memory", "error_type": "generation"}),
                                      stats, "v")
    assert e.value.kind == "generation" and "mid-stream" in str(e.value) and "out of memory" in str(e.value)


def test_entry_points(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, str(root / "app.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--server" in out.stdout and "--api-key-file" in out.stdout
    empty = tmp_path / "key"
    empty.write_text("\n")
    for argv in (["app.py", "--api-key-file", str(empty)], ["-m", "deltahub.cli.main", "ui", "--api-key-file",
                                                             str(tmp_path / "missing")]):
        args = [str(root / argv[0]), *argv[1:]] if argv[0] == "app.py" else argv
        out = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 1 and out.stderr.startswith("error: --api-key-file"), out.stderr

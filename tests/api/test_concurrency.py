"""Many concurrent streaming clients over several variants; clients that go away free their KV blocks."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx

from deltahub import toy

VARIANTS = ("upper", "reverse", "double", "lora")


def _stats(url: str) -> dict:
    return httpx.get(f"{url}/info", timeout=30).json()["stats"]


def _metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def _wait_idle(url: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = _stats(url)
        if (s["kv_blocks_used"] == 0 and s["running"] == 0) or time.monotonic() > deadline:
            return s
        time.sleep(0.05)


async def _tgi_stream(client: httpx.AsyncClient, variant: str, prompt: str) -> str:
    body = {"inputs": prompt, "parameters": {"adapter_id": variant, "max_new_tokens": 4}}
    final = None
    async with client.stream("POST", "/generate_stream", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                event = json.loads(line[6:])
                assert "error" not in event, event
                if event["generated_text"] is not None:
                    final = event["generated_text"]
    assert final is not None
    return final


async def _chat_stream(client: httpx.AsyncClient, variant: str, prompt: str) -> str:
    body = {
        "model": variant,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 4,
        "temperature": 0,
        "stream": True,
    }
    text, done = "", False
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200, await r.aread()
        async for line in r.aiter_lines():
            if line == "data: [DONE]":
                done = True
            elif line.startswith("data: "):
                chunk = json.loads(line[6:])
                assert "error" not in chunk, chunk
                text += chunk["choices"][0]["delta"]["content"] or ""
    assert done
    return text


def test_100_concurrent_streams_over_4_variants(live):
    prompt = "bright stars"
    raw = toy.chat_text(prompt)
    before = _metric(live.url, "tgi_request_success")

    async def main():
        limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
        async with httpx.AsyncClient(base_url=live.url, timeout=300, limits=limits) as client:
            # one sequential answer per variant and route, then 100 at once
            want = {
                (v, k): await (_tgi_stream if k == "tgi" else _chat_stream)(
                    client, v, raw if k == "tgi" else prompt
                )
                for v in VARIANTS
                for k in ("tgi", "chat")
            }
            jobs = [(VARIANTS[i % 4], "tgi" if i % 2 else "chat") for i in range(100)]
            got = await asyncio.gather(
                *(
                    (_tgi_stream(client, v, raw) if k == "tgi" else _chat_stream(client, v, prompt))
                    for v, k in jobs
                )
            )
            return want, jobs, got

    want, jobs, got = asyncio.run(main())
    assert len(got) == 100
    for (v, k), text in zip(jobs, got, strict=True):
        assert text == want[(v, k)], (v, k)
    assert len({want[(v, "tgi")] for v in VARIANTS}) == 4  # four variants, four different answers
    assert _metric(live.url, "tgi_request_success") - before == 108
    assert _wait_idle(live.url)["kv_blocks_used"] == 0


def _generated(url: str, variant: str) -> int:
    info = httpx.get(f"{url}/info", timeout=30).json()
    return next(v["generated_tokens"] for v in info["variants"] if v["name"] == variant)


def test_stream_disconnect_frees_blocks(live):
    assert _wait_idle(live.url)["kv_blocks_used"] == 0
    cancelled = _metric(live.url, "tgi_request_failure", '{err="cancelled"}')
    generated = _generated(live.url, "upper")
    body = {
        "model": "upper",
        "prompt": "abc",
        "max_tokens": 500,
        "ignore_eos": True,
        "stream": True,
        "temperature": 0,
    }
    with (
        httpx.Client(base_url=live.url, timeout=60) as client,
        client.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                break  # one token, then hang up
    idle = _wait_idle(live.url)
    assert idle["kv_blocks_used"] == 0 and idle["running"] == 0
    assert _metric(live.url, "tgi_request_failure", '{err="cancelled"}') == cancelled + 1
    assert _generated(live.url, "upper") - generated < 500  # aborted, not run to max_tokens


def test_non_stream_disconnect_frees_blocks(live):
    assert _wait_idle(live.url)["kv_blocks_used"] == 0
    generated = _generated(live.url, "reverse")
    body = {"model": "reverse", "prompt": "abc", "max_tokens": 500, "ignore_eos": True, "temperature": 0}
    try:
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=0.2)
        raise AssertionError("expected the client to time out")
    except httpx.ReadTimeout:
        pass
    idle = _wait_idle(live.url)
    assert idle["kv_blocks_used"] == 0 and idle["running"] == 0
    assert _generated(live.url, "reverse") - generated < 500
    r = httpx.post(f"{live.url}/v1/completions", json={**body, "max_tokens": 2}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

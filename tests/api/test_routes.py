"""/info, /v1/models, /metrics, /health, /tokenize, TGI options, timing headers, API keys, run-time
variants, the concurrency limit and an engine that stopped."""

from __future__ import annotations

import asyncio
import json
import re

import httpx
import pytest

from deltahub import toy

from .conftest import serve

RAW = toy.chat_text("quiet river")


def _post(url: str, path: str, body: dict, **kw) -> httpx.Response:
    return httpx.post(f"{url}{path}", json=body, timeout=120, **kw)


def test_info_lists_variants(live):
    info = httpx.get(f"{live.url}/info").json()
    for key in (
        "model_id",
        "max_concurrent_requests",
        "max_best_of",
        "max_stop_sequences",
        "max_input_tokens",
        "max_total_tokens",
        "max_client_batch_size",
        "version",
        "router",
        "model_dtype",
    ):
        assert key in info, key
    assert (
        info["model_id"] == "toy-base"
        and info["max_total_tokens"] == 512
        and info["model_dtype"] == "float32"
    )
    by_name = {v["name"]: v for v in info["variants"]}
    assert {"upper", "reverse", "double", "lora"} <= set(by_name)
    for v in by_name.values():
        assert {"name", "source", "kind", "tier", "bytes", "codec"} <= set(v)
    assert by_name["upper"]["kind"] == "delta" and by_name["lora"]["kind"] == "lora"
    assert by_name["upper"]["codec"]["name"] == "rtn" and by_name["upper"]["codec"]["bits"] == 4
    assert by_name["lora"]["codec"]["name"] == "peft-lora"
    models = httpx.get(f"{live.url}/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == "toy-base"
    assert {m["id"] for m in models["data"]} == {"toy-base", *by_name}


def test_generate_headers_and_details(live):
    r = _post(
        live.url,
        "/generate",
        {
            "inputs": RAW,
            "parameters": {
                "adapter_id": "upper",
                "max_new_tokens": 5,
                "details": True,
                "decoder_input_details": True,
                "top_n_tokens": 2,
                "return_full_text": True,
            },
        },
    )
    assert r.status_code == 200, r.text
    assert r.headers["x-compute-type"] == "cpu"
    for h in (
        "x-compute-time",
        "x-queue-time",
        "x-inference-time",
        "x-time-per-token",
        "x-total-time",
        "x-validation-time",
    ):
        assert float(r.headers[h]) >= 0
    body = r.json()
    d = body["details"]
    assert r.headers["x-adapter-id"] == "upper"
    assert int(r.headers["x-generated-tokens"]) == d["generated_tokens"] == len(d["tokens"]) <= 5
    assert int(r.headers["x-prompt-tokens"]) == len(d["prefill"])
    assert body["generated_text"].startswith(RAW)  # return_full_text
    assert d["prefill"][0]["logprob"] is None and all(p["logprob"] <= 0 for p in d["prefill"][1:])
    assert all(len(t) == 2 for t in d["top_tokens"]) and all(t["logprob"] <= 0 for t in d["tokens"])
    # the chosen (greedy) token is the most likely one
    assert [t["id"] for t in d["tokens"]] == [top[0]["id"] for top in d["top_tokens"]]
    compat = _post(live.url, "/", {"inputs": RAW, "parameters": {"adapter_id": "upper", "max_new_tokens": 5}})
    assert (
        isinstance(compat.json(), list)
        and compat.json()[0]["generated_text"] == body["generated_text"][len(RAW) :]
    )


def test_stop_sequences_and_sampling(live):
    free = _post(
        live.url,
        "/generate",
        {"inputs": RAW, "parameters": {"adapter_id": "double", "max_new_tokens": 12, "details": True}},
    ).json()
    text = free["generated_text"]
    assert len(text) > 3
    stop = text[2:4]
    cut = _post(
        live.url,
        "/generate",
        {
            "inputs": RAW,
            "parameters": {"adapter_id": "double", "max_new_tokens": 12, "stop": [stop], "details": True},
        },
    ).json()
    assert (
        cut["details"]["finish_reason"] == "stop_sequence"
        and cut["generated_text"] == text[: text.index(stop)]
    )
    sampled = [
        _post(
            live.url,
            "/generate",
            {
                "inputs": RAW,
                "parameters": {
                    "do_sample": True,
                    "seed": 7,
                    "temperature": 1.5,
                    "max_new_tokens": 8,
                    "details": True,
                },
            },
        ).json()
        for _ in range(2)
    ]
    assert sampled[0]["generated_text"] == sampled[1]["generated_text"]  # seeded: reproducible
    assert sampled[0]["details"]["seed"] == 7
    best = _post(
        live.url,
        "/generate",
        {
            "inputs": RAW,
            "parameters": {"best_of": 2, "do_sample": True, "max_new_tokens": 4, "details": True},
        },
    ).json()
    assert len(best["details"]["best_of_sequences"]) == 1


def test_tokenize(live):
    r = _post(live.url, "/tokenize", {"inputs": "abc"})
    assert [t["text"] for t in r.json()] == ["a", "b", "c"] and r.json()[2]["start"] == 2


def test_metrics_names(live):
    _post(
        live.url, "/generate", {"inputs": RAW, "parameters": {"adapter_id": "reverse", "max_new_tokens": 3}}
    )
    text = httpx.get(f"{live.url}/metrics").text
    for name in (
        "tgi_request_count",
        "tgi_request_success",
        "tgi_queue_size",
        "tgi_batch_current_size",
        "tgi_batch_current_max_tokens",
        "tgi_request_duration_bucket",
        "tgi_request_queue_duration_count",
        "tgi_request_inference_duration_sum",
        "tgi_request_generated_tokens_count",
        "tgi_request_input_length_bucket",
        "tgi_request_mean_time_per_token_duration_count",
    ):
        assert re.search(rf"^{name}[ {{]", text, re.M), name
    for series in (
        'deltahub_variant_requests_total{variant="reverse"}',
        'deltahub_variant_generated_tokens_total{variant="reverse"}',
        'deltahub_variant_cold_loads_total{variant="reverse"}',
        'deltahub_variant_load_seconds_total{variant="reverse"}',
        "deltahub_kv_blocks_free",
    ):
        m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
        assert m and float(m.group(1)) >= 0, series
    assert re.search(r'^deltahub_variant_requests_total\{variant="reverse"\} [1-9]', text, re.M)
    assert re.search(r'^deltahub_variant_tier\{tier="\w+",variant="reverse"\} 1.0$', text, re.M)


def test_api_key(engine):
    from deltahub.server.api.app import create_app

    server, thread, url = serve(create_app(engine, api_key="s3cret-key", model_id="toy-base"))
    try:
        assert httpx.get(f"{url}/health").status_code == 200
        for path in ("/info", "/metrics", "/v1/models"):
            assert httpx.get(f"{url}{path}").status_code == 401
        r = _post(url, "/generate", {"inputs": "x"})
        assert r.status_code == 401 and r.json()["error_type"] == "authentication"
        r = _post(
            url,
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "x"}]},
            headers={"Authorization": "Bearer wrong"},
        )
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
        assert "s3cret" not in r.text
        ok = _post(
            url,
            "/generate",
            {"inputs": RAW, "parameters": {"max_new_tokens": 2}},
            headers={"Authorization": "Bearer s3cret-key"},
        )
        assert ok.status_code == 200
        import openai

        client = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret-key", max_retries=0)
        assert client.models.list().data[0].id == "toy-base"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def test_load_and_unload_variants(live, api_variants):
    url = live.url
    want = _post(
        url, "/generate", {"inputs": RAW, "parameters": {"adapter_id": "upper", "max_new_tokens": 6}}
    )
    r = _post(url, "/v1/load_delta", {"delta_name": "upper-again", "delta_path": str(api_variants["upper"])})
    assert r.status_code == 200 and "upper-again" in r.text
    assert _post(url, "/v1/load_delta", {"delta_name": "upper-again", "delta_path": "x"}).status_code == 400
    got = _post(
        url, "/generate", {"inputs": RAW, "parameters": {"adapter_id": "upper-again", "max_new_tokens": 6}}
    )
    assert got.json() == want.json()
    r = _post(
        url, "/v1/load_lora_adapter", {"lora_name": "pirate-lora", "lora_path": str(api_variants["lora"])}
    )
    assert r.status_code == 200, r.text
    assert "pirate-lora" in {m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]}
    assert _post(url, "/v1/unload_delta", {"delta_name": "upper-again"}).status_code == 200
    assert _post(url, "/v1/unload_lora_adapter", {"lora_name": "pirate-lora"}).status_code == 200
    gone = _post(url, "/generate", {"inputs": RAW, "parameters": {"adapter_id": "upper-again"}})
    assert gone.status_code == 422 and "upper-again" in gone.json()["error"]
    bad = _post(
        url, "/v1/load_lora_adapter", {"lora_name": "broken", "lora_path": str(api_variants["upper"])}
    )
    assert bad.status_code == 400 and "broken" in bad.json()["error"]["message"]
    assert "broken" not in {v["name"] for v in httpx.get(f"{url}/info").json()["variants"]}


def test_dynamic_variant_by_local_folder(engine, api_variants):
    from deltahub.server.api.app import create_app

    app = create_app(engine, model_id="toy-base", dynamic_variants=True)
    folder = str(api_variants["lora"])

    async def main():
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=120
        ) as c:
            body = {
                "inputs": RAW,
                "parameters": {"adapter_id": folder, "adapter_source": "local", "max_new_tokens": 6},
            }
            dyn = await c.post("/generate", json=body)
            ref = await c.post(
                "/generate", json={"inputs": RAW, "parameters": {"adapter_id": "lora", "max_new_tokens": 6}}
            )
            unknown = await c.post(
                "/generate", json={"inputs": RAW, "parameters": {"adapter_id": "plain-name"}}
            )
            await c.post("/v1/unload_lora_adapter", json={"lora_name": folder})
            return dyn, ref, unknown

    dyn, ref, unknown = asyncio.run(main())
    assert dyn.status_code == 200, dyn.text
    assert dyn.json() == ref.json() and dyn.headers["x-adapter-id"] == folder
    assert unknown.status_code == 422  # not a Hub id, not local: still unknown


def test_overloaded_is_429(engine):
    from deltahub.server.api.app import create_app

    app = create_app(engine, model_id="toy-base", max_concurrent_requests=0)

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            tgi = await c.post("/generate", json={"inputs": "x"})
            oai = await c.post("/v1/completions", json={"prompt": "x"})
            return tgi, oai

    tgi, oai = asyncio.run(main())
    assert tgi.status_code == 429 and tgi.json() == {
        "error": "Model is overloaded",
        "error_type": "overloaded",
    }
    assert oai.status_code == 429 and oai.json()["error"]["type"] == "rate_limit_error"


@pytest.fixture(scope="module")
def stopped_engine(toy_models):
    from deltahub.server.async_llm import AsyncLLM

    eng = AsyncLLM(str(toy_models["base"]), device="cpu", max_model_len=64, max_num_seqs=2)
    eng.shutdown()
    return eng


def test_stopped_engine_is_unhealthy(stopped_engine):
    from deltahub.server.api.app import create_app

    app = create_app(stopped_engine, model_id="toy-base")

    async def main():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            return await c.get("/health"), await c.post("/generate", json={"inputs": RAW})

    health, gen = asyncio.run(main())
    assert health.status_code == 503 and health.json() == {"error": "unhealthy", "error_type": "healthcheck"}
    assert gen.status_code == 503 and json.loads(gen.text)["error_type"] == "unhealthy"

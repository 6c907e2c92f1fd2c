"""Bad inputs -> the right status and error shape, and the server keeps serving afterwards."""

from __future__ import annotations

import json

import httpx
import pytest

LONG = "word " * 400  # more tokens than max_input_tokens of the test server
TGI, OAI = "tgi", "openai"

# (id, method, path, body (dict = JSON, bytes = raw), headers, status, shape, error_type / OpenAI type)
CASES = [
    ("malformed-json", "POST", "/generate", b'{"inputs": "x",', None, 400, TGI, "validation"),
    ("empty-body", "POST", "/generate", b"", None, 400, TGI, "validation"),
    ("array-body", "POST", "/generate", b"[1, 2]", None, 422, TGI, "validation"),
    (
        "text-content-type",
        "POST",
        "/generate",
        b'{"inputs": "x"}',
        {"content-type": "text/plain"},
        415,
        TGI,
        "validation",
    ),
    (
        "form-content-type",
        "POST",
        "/generate",
        b"inputs=x",
        {"content-type": "application/x-www-form-urlencoded"},
        415,
        TGI,
        "validation",
    ),
    ("inputs-int", "POST", "/generate", {"inputs": 5}, None, 422, TGI, "validation"),
    ("inputs-missing", "POST", "/generate", {"parameters": {}}, None, 422, TGI, "validation"),
    (
        "parameters-list",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": [1]},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "temperature-zero",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"temperature": 0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "temperature-negative",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"temperature": -1.0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "temperature-string",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"temperature": "hot"}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "top-p-one",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"top_p": 1.0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "top-p-zero",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"top_p": 0.0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "top-k-zero",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"top_k": 0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "top-k-float",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"top_k": 1.5}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "max-new-tokens-zero",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"max_new_tokens": 0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "max-new-tokens-negative",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"max_new_tokens": -3}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "repetition-penalty-zero",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"repetition_penalty": 0}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "frequency-penalty-range",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"frequency_penalty": 3}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "typical-p-range",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"typical_p": 1.5}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "too-many-stops",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"stop": list("abcde")}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "stop-not-list",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"stop": "a"}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "best-of-greedy",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"best_of": 2}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "best-of-too-many",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"best_of": 3, "do_sample": True}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "best-of-with-seed",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True, "seed": 1}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "seed-negative",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"seed": -1}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "top-n-tokens-too-many",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"top_n_tokens": 50}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "truncate-zero",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"truncate": 0}},
        None,
        422,
        TGI,
        "validation",
    ),
    ("inputs-empty", "POST", "/generate", {"inputs": ""}, None, 422, TGI, "validation"),
    (
        "prompt-too-long",
        "POST",
        "/generate",
        {"inputs": LONG, "parameters": {"max_new_tokens": 1}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "total-too-long",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"max_new_tokens": 100000}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "unknown-adapter",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"adapter_id": "no-such-variant"}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "adapter-source-s3",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"adapter_id": "upper", "adapter_source": "s3"}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "details-string",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"details": "yes"}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "grammar",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"grammar": {"type": "regex", "value": "a+"}}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "watermark",
        "POST",
        "/generate",
        {"inputs": "x", "parameters": {"watermark": True}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "stream-best-of",
        "POST",
        "/generate_stream",
        {"inputs": "x", "parameters": {"best_of": 2, "do_sample": True}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "stream-decoder-details",
        "POST",
        "/generate_stream",
        {"inputs": "x", "parameters": {"decoder_input_details": True}},
        None,
        422,
        TGI,
        "validation",
    ),
    (
        "unknown-adapter-header",
        "POST",
        "/generate_stream",
        {"inputs": "x"},
        {"x-adapter-id": "nope"},
        422,
        TGI,
        "validation",
    ),
    ("compat-stream-string", "POST", "/", {"inputs": "x", "stream": "yes"}, None, 422, TGI, "validation"),
    (
        "tokenize-unknown-variant",
        "POST",
        "/tokenize",
        {"inputs": "x", "parameters": {"adapter_id": "nope"}},
        None,
        422,
        TGI,
        "validation",
    ),
    ("get-on-post-route", "GET", "/generate", None, None, 405, TGI, "method_not_allowed"),
    ("unknown-route", "GET", "/no/such/route", None, None, 404, TGI, "not_found"),
    # OpenAI routes: OpenAI's error shape
    (
        "chat-malformed-json",
        "POST",
        "/v1/chat/completions",
        b"{nope",
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-no-messages",
        "POST",
        "/v1/chat/completions",
        {"model": "upper"},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-empty-messages",
        "POST",
        "/v1/chat/completions",
        {"messages": []},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-bad-role",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "robot", "content": "x"}]},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-unknown-model",
        "POST",
        "/v1/chat/completions",
        {"model": "no-such-variant", "messages": [{"role": "user", "content": "x"}]},
        None,
        404,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-temperature-range",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "temperature": 3},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-n-two",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "n": 2},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-max-tokens-zero",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "max_tokens": 0},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-top-logprobs-range",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 30},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-tools",
        "POST",
        "/v1/chat/completions",
        {
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
        },
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-too-many-stops",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stop": list("abcdef")},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-prompt-too-long",
        "POST",
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": LONG}], "max_tokens": 1},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "chat-wrong-content-type",
        "POST",
        "/v1/chat/completions",
        b'{"messages": []}',
        {"content-type": "text/plain"},
        415,
        OAI,
        "invalid_request_error",
    ),
    (
        "completions-suffix",
        "POST",
        "/v1/completions",
        {"prompt": "x", "suffix": "y"},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "completions-empty-prompt",
        "POST",
        "/v1/completions",
        {"prompt": ""},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "completions-batch-too-big",
        "POST",
        "/v1/completions",
        {"prompt": ["a"] * 9},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "completions-logprobs-range",
        "POST",
        "/v1/completions",
        {"prompt": "x", "logprobs": 9},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "completions-token-out-of-vocab",
        "POST",
        "/v1/completions",
        {"prompt": [1, 10**9]},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "load-lora-missing-path",
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "x"},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "load-delta-bad-path",
        "POST",
        "/v1/load_delta",
        {"delta_name": "x", "delta_path": "/no/such/folder"},
        None,
        400,
        OAI,
        "invalid_request_error",
    ),
    (
        "unload-unknown",
        "POST",
        "/v1/unload_lora_adapter",
        {"lora_name": "never-loaded"},
        None,
        404,
        OAI,
        "invalid_request_error",
    ),
]


def _send(client: httpx.Client, method, path, body, headers):
    headers = dict(headers or {})
    if isinstance(body, dict):
        content = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    else:
        content = body
        if body is not None:
            headers.setdefault("content-type", "application/json")
    return client.request(method, path, content=content, headers=headers)


def test_table_has_enough_cases():
    assert len(CASES) >= 40
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input(live, case):
    _, method, path, body, headers, status, shape, etype = case
    with httpx.Client(base_url=live.url, timeout=60) as client:
        r = _send(client, method, path, body, headers)
    assert r.status_code == status, r.text
    payload = r.json()
    if shape == TGI:
        assert set(payload) == {"error", "error_type"}, payload
        assert payload["error_type"] == etype
        assert payload["error"]
    else:
        err = payload["error"]
        assert set(err) == {"message", "type", "param", "code"}, payload
        assert err["type"] == etype and err["message"]


def test_unknown_variant_is_named(live):
    r = httpx.post(f"{live.url}/generate", json={"inputs": "x", "parameters": {"adapter_id": "zebra-7"}})
    assert r.status_code == 422 and "zebra-7" in r.json()["error"]
    r = httpx.post(
        f"{live.url}/v1/chat/completions",
        json={"model": "zebra-7", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 404 and "zebra-7" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "model_not_found"


def test_server_keeps_serving_after_bad_inputs(live):
    with httpx.Client(base_url=live.url, timeout=60) as client:
        for case in CASES[:10]:
            _send(client, *case[1:5])
        r = client.post("/generate", json={"inputs": "abc", "parameters": {"max_new_tokens": 2}})
        assert r.status_code == 200, r.text
        assert 1 <= int(r.headers["x-generated-tokens"]) <= 2
        r = client.post(
            "/v1/chat/completions",
            json={"model": "upper", "messages": [{"role": "user", "content": "abc"}], "max_tokens": 2},
        )
        assert r.status_code == 200, r.text

"""Three unmodified clients against the live server: text-generation 0.7, huggingface_hub's
InferenceClient and openai. Each shows two variants answering differently, and exactly as the
engine's Python API answers the same (greedy) request."""

from __future__ import annotations

import asyncio

import pytest

from deltahub import toy

PROMPT = "happy cats"
MESSAGES = [{"role": "user", "content": PROMPT}]
N = 10  # max new tokens
PAIR = ("upper", "reverse")


def _engine_text(
    engine, variant: str | None, *, prompt: str | None = None, ids: list[int] | None = None
) -> str:
    """The engine's own answer (AsyncLLM.generate, greedy) to a prompt string or token ids."""
    from deltahub.server.sampling import SamplingParams

    async def run():
        last = None
        async for out in engine.generate(
            None,
            prompt=prompt,
            prompt_token_ids=ids,
            params=SamplingParams(max_new_tokens=N, temperature=0.0),
            variant=variant,
        ):
            last = out
        return last.text

    return asyncio.run(run())


def _chat_ids(engine, variant: str | None) -> list[int]:
    tok = engine.tokenizer(variant)
    text = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=False)
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def expected(live):
    """{variant: (answer to the raw TGI prompt, answer to the chat messages)} from the engine."""
    raw = toy.chat_text(PROMPT)
    out = {
        v: (
            _engine_text(live.engine, v, prompt=raw),
            _engine_text(live.engine, v, ids=_chat_ids(live.engine, v)),
        )
        for v in PAIR
    }
    assert out["upper"][0] != out["reverse"][0] and out["upper"][1] != out["reverse"][1]
    assert all(t for pair in out.values() for t in pair)
    return out


def test_text_generation_client(live, expected):
    from text_generation import Client

    raw = toy.chat_text(PROMPT)
    for variant in PAIR:
        # text-generation 0.7 cannot send adapter_id: the x-adapter-id header picks the variant
        client = Client(live.url, headers={"x-adapter-id": variant}, timeout=120)
        resp = client.generate(raw, max_new_tokens=N)
        assert resp.generated_text == expected[variant][0]
        assert resp.details.generated_tokens == len(resp.details.tokens) <= N
        assert resp.details.finish_reason.value in ("length", "eos_token")
        events = list(client.generate_stream(raw, max_new_tokens=N))
        assert events[-1].generated_text == expected[variant][0]
        assert all(e.generated_text is None for e in events[:-1])
        assert "".join(e.token.text for e in events if not e.token.special) == expected[variant][0]
        chat = client.chat(MESSAGES, max_tokens=N, temperature=0)
        assert chat.choices[0].message.content == expected[variant][1]


def test_huggingface_hub_inference_client(live, expected):
    from huggingface_hub import InferenceClient

    client = InferenceClient(base_url=live.url, timeout=120)
    raw = toy.chat_text(PROMPT)
    for variant in PAIR:
        assert client.text_generation(raw, max_new_tokens=N, adapter_id=variant) == expected[variant][0]
        details = client.text_generation(
            raw, max_new_tokens=N, adapter_id=variant, details=True, decoder_input_details=True
        )
        assert details.generated_text == expected[variant][0]
        assert [t.id for t in details.details.prefill] == live.engine.tokenizer(variant)(raw)["input_ids"]
        stream = list(
            client.text_generation(raw, max_new_tokens=N, adapter_id=variant, stream=True, details=True)
        )
        assert "".join(s.token.text for s in stream if not s.token.special) == expected[variant][0]
        assert stream[-1].details.finish_reason in ("length", "eos_token")

        chat = client.chat_completion(MESSAGES, model=variant, max_tokens=N, temperature=0)
        assert chat.choices[0].message.content == expected[variant][1]
        assert chat.usage.completion_tokens >= 1
        chunks = list(
            client.chat_completion(MESSAGES, model=variant, max_tokens=N, temperature=0, stream=True)
        )
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[variant][1]


def test_openai_client(live, expected):
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
    raw = toy.chat_text(PROMPT)
    for variant in PAIR:
        chat = client.chat.completions.create(model=variant, messages=MESSAGES, max_tokens=N, temperature=0)
        assert chat.choices[0].message.content == expected[variant][1]
        assert chat.model == variant and chat.object == "chat.completion"
        stream = client.chat.completions.create(
            model=variant,
            messages=MESSAGES,
            max_tokens=N,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected[variant][1]
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")

        comp = client.completions.create(model=variant, prompt=raw, max_tokens=N, temperature=0, logprobs=2)
        assert comp.choices[0].text == expected[variant][0]
        assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens
        stream = client.completions.create(
            model=variant, prompt=raw, max_tokens=N, temperature=0, stream=True
        )
        assert "".join(c.choices[0].text for c in stream) == expected[variant][0]

    models = {m.id for m in client.models.list()}
    assert {"toy-base", "upper", "reverse", "double", "lora"} <= models
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES, max_tokens=2)


def test_base_and_lora_answer_as_the_engine(live):
    """model "" / "tgi" / the base id mean the base; a PEFT LoRA variant answers like the engine."""
    import openai

    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
    base = _engine_text(live.engine, None, ids=_chat_ids(live.engine, None))
    for name in ("tgi", "toy-base", ""):
        out = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=N, temperature=0)
        assert out.choices[0].message.content == base
    lora = _engine_text(live.engine, "lora", ids=_chat_ids(live.engine, "lora"))
    out = client.chat.completions.create(model="lora", messages=MESSAGES, max_tokens=N, temperature=0)
    assert out.choices[0].message.content == lora != base

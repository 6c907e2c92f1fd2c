"""AsyncLLM: streaming per token, abort by closing the stream, errors, run-time variants."""

from __future__ import annotations

import asyncio

import pytest
from deltahub.server import (
    AsyncLLM,
    EngineConfig,
    RequestValidationError,
    SamplingParams,
    UnknownVariantError,
    VariantLoadError,
)

from deltahub import toy


@pytest.fixture(scope="module")
def allm(toy_models, toy_deltas):
    a = AsyncLLM.from_cli_args(str(toy_models["base"]), [f"upper={toy_deltas['upper']}"], max_gpu_variants=2)
    yield a
    a.shutdown()


def run(coro):
    return asyncio.run(coro)


def test_stream_tokens_and_match_sync(allm, toy_models, toy_deltas):
    from deltahub.server import LLM

    prompt = toy.chat_text("stream me")

    async def go():
        outs = []
        async for o in allm.generate(
            "s1", prompt, params=SamplingParams(max_new_tokens=10, logprobs=True), variant="upper"
        ):
            outs.append(o)
        return outs

    outs = run(go())
    assert all(len(o.new_token_ids) == 1 for o in outs)  # one event per token
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    assert [t for o in outs for t in o.new_token_ids] == outs[-1].token_ids
    assert "".join(o.new_text for o in outs) == outs[-1].text
    assert [lp for o in outs for lp in o.new_logprobs] == outs[-1].logprobs
    sync = LLM(str(toy_models["base"]), {"upper": str(toy_deltas["upper"])})
    assert (
        sync.generate(prompt, SamplingParams(max_new_tokens=10), "upper")[0].token_ids == outs[-1].token_ids
    )
    assert outs[-1].queue_time >= 0 and outs[-1].inference_time > 0


def test_concurrent_streams_and_abort(allm):
    async def consume(i, stop_after=None):
        got = []
        params = SamplingParams(max_new_tokens=30, ignore_eos=True)
        stream = await allm.add_request(
            f"c{i}", toy.chat_text(f"req {i}"), params=params, variant="upper" if i % 2 else None
        )
        async for o in stream:
            got.append(o)
            if stop_after and len(got) >= stop_after:
                break  # a client that goes away
        await stream.aclose()
        return got

    async def go():
        res = await asyncio.gather(*[consume(i, stop_after=3 if i < 4 else None) for i in range(12)])
        for _ in range(100):  # the aborts reach the loop thread
            st = allm.stats()
            if st["running"] == 0 and st["queue_size"] == 0:
                break
            await asyncio.sleep(0.02)
        return res, allm.stats()

    res, st = run(go())
    assert all(len(r) == 3 for r in res[:4])
    assert all(r[-1].finished and len(r[-1].token_ids) == 30 for r in res[4:])
    assert st["kv_blocks_used"] == 0 and st["running"] == 0


def test_errors_are_raised_before_streaming(allm, tmp_path):
    async def go():
        with pytest.raises(UnknownVariantError):
            await allm.add_request("e1", "hi", params=SamplingParams(), variant="nope")
        with pytest.raises(RequestValidationError):
            await allm.add_request("e2", "hi", params=SamplingParams(max_new_tokens=0))
        with pytest.raises(VariantLoadError):
            await allm.add_variant("ghost", str(tmp_path / "ghost"))
        assert all(v.name != "ghost" for v in allm.variants())

    run(go())


def test_add_variant_at_run_time(allm, toy_deltas):
    async def go():
        info = await allm.add_variant("pirate", str(toy_deltas["pirate"]))
        assert info.tier in ("host", "gpu") and info.kind == "delta" and info.bytes > 0
        text = ""
        async for o in allm.generate(
            None, toy.chat_text("hello you"), params=SamplingParams(max_new_tokens=30), variant="pirate"
        ):
            text = o.text
        await allm.remove_variant("pirate")
        return text

    assert run(go()).startswith("arr")
    assert allm.healthy and "pirate" not in {v.name for v in allm.variants()}


def test_from_cli_args_config():
    cfg = EngineConfig.from_kwargs(max_gpu_variants=3)
    assert cfg.max_gpu_variants == 3
    from deltahub.server.config import parse_variant_specs

    assert parse_variant_specs(["a=org/x", "./y/z@v1"]) == {"a": "org/x", "z": "./y/z@v1"}
    with pytest.raises(Exception, match="twice"):
        parse_variant_specs(["a=1", "a=2"])

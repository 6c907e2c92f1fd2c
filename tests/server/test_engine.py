"""Engine behaviour on the toy models: preemption, failed loads, sampling options, validation,
abort, variants added and removed at run time."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from deltahub.server import (
    LLM,
    EngineConfig,
    RequestValidationError,
    SamplingParams,
    UnknownVariantError,
    VariantLoadError,
)
from deltahub.server.engine import Engine

from deltahub import toy

PROMPTS = ["one two three", "hello there world", "abc def", "the lazy dog sleeps"]


def chat_ids(tok, p):
    return tok(toy.chat_text(p), add_special_tokens=False)["input_ids"]


@pytest.fixture(scope="module")
def llm(toy_models, toy_deltas, toy_lora):
    m = LLM(
        str(toy_models["base"]),
        {"upper": str(toy_deltas["upper"]), "pirate": str(toy_deltas["pirate"]), "lora": str(toy_lora)},
        max_gpu_variants=2,
        max_num_seqs=8,
    )
    yield m
    m.shutdown()


def run_all(engine: Engine, reqs: list[tuple[str, list[int], str | None, SamplingParams]]) -> dict:
    for rid, ids, v, p in reqs:
        engine.add_request(rid, None, p, v, prompt_token_ids=ids)
    done = {}
    for _ in range(2000):
        if not engine.has_unfinished():
            break
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
    return done


def test_preemption_and_resume_give_the_same_tokens(toy_models, toy_deltas, toy_tokenizer):
    variants = {"upper": str(toy_deltas["upper"]), "reverse": str(toy_deltas["reverse"])}
    reqs = [
        (
            f"r{i}",
            chat_ids(toy_tokenizer, p),
            [None, "upper", "reverse"][i % 3],
            SamplingParams(max_new_tokens=24, ignore_eos=True),
        )
        for i, p in enumerate(PROMPTS * 2)
    ]
    roomy = Engine(str(toy_models["base"]), variants, EngineConfig(block_size=4, max_num_seqs=8))
    want = run_all(roomy, reqs)
    tight = Engine(
        str(toy_models["base"]), variants, EngineConfig(block_size=4, max_num_seqs=8, num_kv_blocks=24)
    )
    got = run_all(tight, reqs)
    assert tight.counters["preemptions"] > 0
    assert sum(o.num_preemptions for o in got.values()) > 0
    assert {r: o.token_ids for r, o in got.items()} == {r: o.token_ids for r, o in want.items()}
    assert tight.blocks.num_used == 0 and len(want) == len(reqs)


def test_failed_variant_load_fails_only_its_requests(toy_models, toy_deltas, toy_tokenizer, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(toy_deltas["pirate"], corrupt)
    data = (corrupt / "delta.safetensors").read_bytes()
    (corrupt / "delta.safetensors").write_bytes(data[: len(data) // 2])
    wrong_base = tmp_path / "wrong-base"
    shutil.copytree(toy_deltas["upper"], wrong_base)
    cfg = json.loads((wrong_base / "delta_config.json").read_text())
    cfg["base_model"]["fingerprint"] = "sha256:" + "0" * 64
    (wrong_base / "delta_config.json").write_text(json.dumps(cfg))
    variants = {
        "upper": str(toy_deltas["upper"]),
        "corrupt": str(corrupt),
        "wrong": str(wrong_base),
        "missing": str(tmp_path / "nowhere"),
    }
    engine = Engine(str(toy_models["base"]), variants, EngineConfig(max_gpu_variants=2))
    ids = chat_ids(toy_tokenizer, "fine words")
    reqs = [
        (f"{v}-{i}", ids, v, SamplingParams(max_new_tokens=8))
        for i in range(2)
        for v in (None, "upper", "corrupt", "wrong", "missing")
    ]
    done = run_all(engine, reqs)
    assert len(done) == len(reqs)
    for rid, o in done.items():
        if rid.startswith(("None", "upper")):
            assert o.error is None and len(o.token_ids) > 0
        else:
            assert o.finish_reason == "error" and o.error_type == "VariantLoadError" and o.token_ids == []
    assert "corrupt" in done["corrupt-0"].error or "delta.safetensors" in done["corrupt-0"].error
    assert "fingerprint" in done["wrong-0"].error
    assert done["upper-0"].token_ids == done["upper-1"].token_ids
    assert engine.cache.info("wrong").tier == "failed"


def test_sampling_options(llm, toy_tokenizer):
    prompt = toy.chat_text("sampling words here")
    g = llm.generate(
        prompt,
        SamplingParams(
            max_new_tokens=12, logprobs=True, top_logprobs=3, prompt_logprobs=True, ignore_eos=True
        ),
    )[0]
    assert len(g.token_ids) == 12 and g.finish_reason == "length"
    assert [t[0][0] for t in g.top_logprobs] == g.token_ids  # greedy = the most likely token
    assert all(abs(lp - t[0][1]) < 1e-5 for lp, t in zip(g.logprobs, g.top_logprobs, strict=True))
    n_prompt = len(g.prompt_token_ids)
    assert len(g.prompt_logprobs) == n_prompt and g.prompt_logprobs[0] is None
    assert all(lp <= 0 for lp in g.prompt_logprobs[1:])
    # seeded sampling: reproducible alone and inside a batch; other seeds differ
    p = dict(max_new_tokens=16, temperature=1.5, top_k=50, top_p=0.95, ignore_eos=True)
    a = llm.generate(prompt, SamplingParams(seed=7, **p))[0].token_ids
    batch = llm.generate(
        [prompt] * 3, [SamplingParams(seed=s, **p) for s in (1, 7, 2)], ["upper", None, "lora"]
    )
    assert batch[1].token_ids == a
    assert len({tuple(o.token_ids) for o in batch}) == 3
    # repetition penalty changes a repetitive greedy output
    rp = llm.generate(prompt, SamplingParams(max_new_tokens=12, repetition_penalty=2.0, ignore_eos=True))[0]
    assert rp.token_ids != g.token_ids
    # stop sequences cut the text; EOS ends generation unless ignored
    text = g.text
    stop = text[4:7]
    s = llm.generate(prompt, SamplingParams(max_new_tokens=12, stop=[stop], ignore_eos=True))[0]
    assert s.finish_reason == "stop_sequence" and s.text == text[: text.find(stop)]
    pir = llm.generate(toy.chat_text("one two"), SamplingParams(max_new_tokens=40), "pirate")[0]
    assert pir.finish_reason == "eos_token" and pir.token_ids[-1] == toy_tokenizer.eos_token_id
    assert pir.text.startswith("arr")


def test_top_k_one_is_greedy(llm):
    prompt = toy.chat_text("quiet river")
    g = llm.generate(prompt, SamplingParams(max_new_tokens=10))[0]
    k1 = llm.generate(prompt, SamplingParams(max_new_tokens=10, temperature=0.8, top_k=1, seed=3))[0]
    assert k1.token_ids == g.token_ids


@pytest.mark.parametrize(
    "kwargs, params",
    [
        (dict(prompt=""), SamplingParams()),
        (dict(prompt="x" * 600), SamplingParams()),
        (dict(prompt="hi"), SamplingParams(max_new_tokens=0)),
        (dict(prompt="hi"), SamplingParams(top_p=0.0)),
        (dict(prompt="hi"), SamplingParams(temperature=-1.0)),
        (dict(prompt="hi"), SamplingParams(stop=["a"] * 17)),
        (dict(prompt="hi"), SamplingParams(top_logprobs=99)),
        (dict(prompt=None, prompt_token_ids=[5, 100000]), SamplingParams()),
    ],
)
def test_request_validation(llm, kwargs, params):
    with pytest.raises(RequestValidationError):
        llm.engine.add_request("bad", params=params, **kwargs)
    assert not llm.engine.has_unfinished()


def test_unknown_variant_and_abort(llm):
    with pytest.raises(UnknownVariantError, match="nope"):
        llm.engine.add_request("u", "hi", SamplingParams(), "nope")
    eng = llm.engine
    eng.add_request("ab", toy.chat_text("hi"), SamplingParams(max_new_tokens=50, ignore_eos=True), "upper")
    for _ in range(3):
        eng.step()
    assert eng.blocks.num_used > 0
    out = eng.abort("ab")
    assert out.finished and out.finish_reason == "abort" and eng.blocks.num_used == 0
    assert not eng.has_unfinished() and eng.cache.entries["upper"].refs == 0


def test_add_and_remove_variants_at_run_time(llm, toy_deltas):
    prompt = toy.chat_text("run time")
    llm.add_variant("reverse", str(toy_deltas["reverse"]))
    rev = llm.generate(prompt, SamplingParams(max_new_tokens=8), "reverse")[0]
    assert rev.error is None and rev.token_ids
    assert any(v.name == "reverse" and v.kind == "delta" for v in llm.variants())
    llm.remove_variant("reverse")
    with pytest.raises(UnknownVariantError):
        llm.generate(prompt, SamplingParams(max_new_tokens=8), "reverse")
    with pytest.raises(VariantLoadError):
        llm.add_variant("upper", str(toy_deltas["reverse"]))  # the name is taken


def test_tokenizer_per_variant_and_stats(llm, toy_lora):
    assert llm.tokenizer("lora").name_or_path.rstrip("/").endswith(toy_lora.name)
    st = llm.stats()
    assert st["kv_blocks_total"] == st["kv_blocks_free"] + st["kv_blocks_used"]
    assert st["variants"]["upper"]["requests"] >= 1 and st["base"]["generated_tokens"] > 0
    assert torch.is_tensor(llm.engine.runner.kv_cache)


def test_dynamic_loading_and_queue_limit(toy_models, toy_deltas):
    from deltahub.server import EngineOverloadedError

    engine = Engine(str(toy_models["base"]), {}, EngineConfig(dynamic_loading=True, max_waiting=2))
    ref = str(toy_deltas["pirate"])  # a request may name a folder / Hub id that is not registered
    engine.add_request("d0", toy.chat_text("one two"), SamplingParams(max_new_tokens=30), ref)
    engine.add_request("d1", toy.chat_text("three"), SamplingParams(max_new_tokens=30), None)
    with pytest.raises(EngineOverloadedError):
        engine.add_request("d2", toy.chat_text("four"), SamplingParams(), None)
    done = {}
    while engine.has_unfinished():
        done |= {o.request_id: o for o in engine.step() if o.finished}
    assert done["d0"].text.startswith("arr") and ref in engine.cache
    static = Engine(str(toy_models["base"]), {}, EngineConfig())
    with pytest.raises(UnknownVariantError):
        static.add_request("s", "hi", SamplingParams(), ref)

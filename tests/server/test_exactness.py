"""Acceptance: a mixed continuous batch (base + 4 compressed deltas + a LoRA adapter, different
prompt lengths, requests arriving at different steps) gives every request exactly the greedy
tokens transformers' generate gives on the full model that variant stands for (fp32, CPU)."""

from __future__ import annotations

import pytest
from deltahub.server import EngineConfig, SamplingParams
from deltahub.server.engine import Engine

from deltahub import toy

from .engine_helpers import hf_greedy, reference_model

PROMPTS = [
    "alpha beta",
    "the quick brown fox",
    "sorted list of words here",
    "abc",
    "many more words in this prompt than the others",
]
MAX_NEW = 20


@pytest.fixture(scope="module")
def variants(toy_deltas, toy_delta_vocab8, toy_lora):
    return {
        "upper": toy_deltas["upper"],
        "reverse": toy_deltas["reverse"],
        "pirate": toy_deltas["pirate"],
        "double": toy_delta_vocab8,  # embedding + lm_head 8-bit dense, linears 4-bit 2:4
        "lora": toy_lora,
    }


def test_mixed_batch_matches_transformers(toy_models, toy_tokenizer, variants):
    engine = Engine(
        str(toy_models["base"]),
        {k: str(v) for k, v in variants.items()},
        EngineConfig(max_gpu_variants=5, max_num_seqs=16, block_size=8, cpu_dequantize_deltas=False),
    )  # the reference kernels every step
    names = [None, *variants]
    plan = []  # (step at which it arrives, request id, variant, prompt ids)
    for i, name in enumerate(names):
        for j, prompt in enumerate(PROMPTS[:3] if name else PROMPTS):
            ids = toy_tokenizer(
                toy.chat_text(PROMPTS[(i + j) % len(PROMPTS)] if name else prompt), add_special_tokens=False
            )["input_ids"]
            plan.append(((i * 3 + j * 2) % 7, f"{name}-{j}", name, ids))
    got: dict[str, list[int]] = {}
    step = 0
    pending = sorted(plan, key=lambda p: p[0])
    max_batch = 0
    mixed_steps = 0
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            _, rid, name, ids = pending.pop(0)
            engine.add_request(rid, None, SamplingParams(max_new_tokens=MAX_NEW), name, prompt_token_ids=ids)
        outs = engine.step()
        running = engine.scheduler.running
        max_batch = max(max_batch, len({s.variant for s in running}))
        mixed_steps += any(o.num_generated_tokens == 1 for o in outs) and any(
            o.num_generated_tokens > 1 for o in outs
        )
        for o in outs:
            assert o.error is None, o.error
            if o.finished:
                got[o.request_id] = o.token_ids
        step += 1
    assert max_batch >= 5, "the variants never ran in one batch"
    assert mixed_steps > 0, "no step mixed prefills and decodes"
    by_variant: dict[str | None, list] = {}
    for _, rid, name, ids in plan:
        by_variant.setdefault(name, []).append((rid, ids))
    first_answers = {}
    for name, reqs in by_variant.items():
        model = reference_model(toy_models["base"], variants[name] if name else None)
        for rid, ids in reqs:
            want = hf_greedy(model, ids, MAX_NEW)
            assert got[rid] == want, f"{rid}: engine {got[rid]} != transformers {want}"
        first_answers[name] = tuple(got[reqs[0][0]])
    # the variants really are different models
    assert len(set(first_answers.values())) >= 5
    engine.shutdown()

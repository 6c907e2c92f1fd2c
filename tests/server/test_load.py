"""CPU load test: 200 requests over 6 variants (4-bit 2:4 deltas, an 8-bit delta, a LoRA) and the
base, 2 GPU slots, arriving in waves -> all complete, with the tokens of a one-at-a-time run."""

from __future__ import annotations

import random
import time

from deltahub.server import EngineConfig, SamplingParams
from deltahub.server.engine import Engine

from deltahub import toy

N_REQUESTS = 200
MAX_NEW = 10


def test_200_requests_6_variants_2_slots(toy_models, toy_deltas, toy_delta_8bit, toy_lora, toy_tokenizer):
    variants = {t: str(toy_deltas[t]) for t in ("upper", "reverse", "double", "pirate")}
    variants |= {"upper8": str(toy_delta_8bit), "lora": str(toy_lora)}
    rng = random.Random(0)
    words = [e["prompt"] for e in toy.task_examples("upper", N_REQUESTS, seed=11)]
    targets = [None, *variants]
    reqs = []
    for i in range(N_REQUESTS):
        v = targets[i % len(targets)] if i % 5 else rng.choice(targets)
        ids = toy_tokenizer(toy.chat_text(words[i]), add_special_tokens=False)["input_ids"]
        reqs.append((f"r{i}", ids, v))

    engine = Engine(
        str(toy_models["base"]),
        variants,
        EngineConfig(max_gpu_variants=2, max_host_variants=3, max_num_seqs=32, max_skips=8),
    )
    t0 = time.monotonic()
    done = {}
    pending = list(reqs)
    max_slots_busy = 0
    while pending or engine.has_unfinished():
        for rid, ids, v in pending[:25]:  # waves of 25 new requests per step
            engine.add_request(rid, None, SamplingParams(max_new_tokens=MAX_NEW), v, prompt_token_ids=ids)
        pending = pending[25:]
        for o in engine.step():
            if o.finished:
                done[o.request_id] = o
        max_slots_busy = max(max_slots_busy, sum(n is not None for n in engine.cache.slots))
        assert time.monotonic() - t0 < 300, "load test is stuck"
    batched_s = time.monotonic() - t0
    assert len(done) == N_REQUESTS and all(o.error is None and o.token_ids for o in done.values())
    stats = engine.stats()
    assert max_slots_busy == 2 and stats["kv_blocks_used"] == 0
    assert sum(v["gpu_loads"] for v in stats["variants"].values()) > len(variants)  # slots were recycled

    # the same requests one at a time (fresh engine: no batching, no eviction pressure)
    alone = Engine(str(toy_models["base"]), variants, EngineConfig(max_gpu_variants=6, max_num_seqs=1))
    for rid, ids, v in reqs:
        alone.add_request(rid, None, SamplingParams(max_new_tokens=MAX_NEW), v, prompt_token_ids=ids)
        while alone.has_unfinished():
            for o in alone.step():
                if o.finished:
                    assert o.token_ids == done[rid].token_ids, f"{rid} ({v}) differs from the sequential run"
    print(f"batched {batched_s:.1f} s, {stats['steps']} steps; waits by skip-the-line bound held")

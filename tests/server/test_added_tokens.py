"""A fine-tune that adds vocabulary (rows past the base's embedding and lm_head, stored whole as
``extra_rows``): served next to the base, its added tokens are read in prompts and generated, and
its greedy tokens equal transformers' on the reconstructed model."""

from __future__ import annotations

import torch
from deltahub.server import EngineConfig, SamplingParams
from deltahub.server.engine import Engine
from .engine_helpers import hf_greedy

from deltahub import toy


def test_added_tokens_served_exactly(toy_models, toy_added_tokens, tmp_path):
    from transformers import AutoModelForCausalLM

    from deltahub.reconstruct import reconstruct

    _, delta = toy_added_tokens
    engine = Engine(
        str(toy_models["base"]),
        {"shout": str(delta)},
        EngineConfig(max_gpu_variants=2, cpu_dequantize_deltas=False),
    )
    tok = engine.tokenizer("shout")
    assert len(tok) == 322 and tok.convert_tokens_to_ids("<|shout|>") == 320
    prompts = ["red green blue <|hush|>", "one two <|hush|>", "alpha beta"]
    reqs = []
    for i, p in enumerate(prompts):
        ids = tok(toy.chat_text(p), add_special_tokens=False)["input_ids"]
        reqs.append((f"v{i}", ids, "shout"))
        if i < 2:
            base_ids = engine.tokenizer(None)(toy.chat_text("plain words"), add_special_tokens=False)[
                "input_ids"
            ]
            reqs.append((f"b{i}", base_ids, None))
    assert max(reqs[0][1]) == 321  # the prompt holds an added token
    for rid, ids, v in reqs:
        engine.add_request(rid, None, SamplingParams(max_new_tokens=24), v, prompt_token_ids=ids)
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            if o.finished:
                done[o.request_id] = o
    rebuilt = reconstruct(delta, tmp_path / "rebuilt", base=toy_models["base"])
    ref = AutoModelForCausalLM.from_pretrained(str(rebuilt), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(toy_models["base"]), dtype=torch.float32).eval()
    for rid, ids, v in reqs:
        want = hf_greedy(ref if v else base, ids, 24)
        assert done[rid].token_ids == want, rid
        if v is None:  # the base never emits the added tokens (their logits are -inf for it)
            assert all(t < 320 for t in done[rid].token_ids)
    assert any(320 in done[r].token_ids for r in ("v0", "v1", "v2"))  # the variant emits <|shout|>
    assert "<|shout|>" not in done["v0"].text  # special tokens are skipped in text

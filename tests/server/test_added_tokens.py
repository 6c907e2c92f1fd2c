"""A fine-tune that adds vocabulary (rows past the base's embedding and lm_head, stored whole as
``extra_rows``): served next to the base, its added tokens are read in prompts and generated, and
its greedy tokens equal transformers' on the reconstructed model."""

from __future__ import annotations

import torch
from deltahub.server import EngineConfig, SamplingParams
from deltahub.server.engine import Engine

from deltahub import toy

from .engine_helpers import hf_greedy


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
    # Both added rows in one prompt: <|hush|> (321) read through the embedding's extra rows and
    # <|shout|> (320) scored through the lm_head's; the engine's prompt log-probs must equal the
    # reconstructed model's (whether greedy decoding happens to emit 320 depends on training).
    text = toy.chat_text("red green blue <|hush|>", "RED GREEN BLUE<|shout|>")
    ids = tok(text, add_special_tokens=False)["input_ids"][:-1]  # drop the final <|end|>: ends with 320
    assert ids[-1] == 320 and 321 in ids
    engine.add_request("forced", None, SamplingParams(max_new_tokens=1, prompt_logprobs=True), "shout",
                       prompt_token_ids=ids)
    out = None
    while engine.has_unfinished():
        for o in engine.step():
            out = o if o.finished else out
    with torch.no_grad():
        want_lp = torch.log_softmax(ref(torch.tensor([ids])).logits[0, :-1].float(), -1)
    got = torch.tensor(out.prompt_logprobs[1:], dtype=torch.float32)
    ref_lp = want_lp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, ref_lp, atol=2e-3, rtol=0)

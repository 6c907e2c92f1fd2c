"""On a CUDA GPU (device tool): the mixed-variant batch in bfloat16 through the Triton kernels.

bf16 cannot be token-exact against fp32: the engine adds x·W_baseᵀ and the delta's x·Δᵀ as two
bf16-rounded terms (rel. error 2⁻⁹ each), the reference multiplies by bf16(W_base + Δ); after two
layers the logits differ by a few hundredths, so a greedy path may legitimately switch at a near
tie. The check is therefore: (1) the first step's logits are within LOGIT_TOL of the fp32
reconstructed model's, and (2) every token the engine emits is within 2·LOGIT_TOL of the best
logit of the fp32 reference fed the engine's own prefix (teacher forcing) -- i.e. it is the
argmax up to bf16 noise -- and (3) most requests (>= 80 %) reproduce the fp32 greedy tokens exactly.
LOGIT_TOL = 0.15 is several times the bf16 error measured on these models (H200, 2026-11-28: worst
first-token log-prob error 0.021, worst teacher-forced gap 0.019, 26 of 30 requests token-exact).
"""

from __future__ import annotations

import pytest
import torch
from deltahub.server import EngineConfig, SamplingParams
from deltahub.server.engine import Engine

from deltahub import toy

from .engine_helpers import hf_greedy, reference_model

pytestmark = pytest.mark.gpu
LOGIT_TOL = 0.15
PROMPTS = [
    "alpha beta",
    "the quick brown fox",
    "sorted list of words here",
    "abc",
    "a longer prompt with words",
]


@pytest.fixture(scope="module")
def cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return torch.device("cuda")


def test_bf16_mixed_batch_close_to_fp32(
    cuda, toy_models, toy_deltas, toy_delta_8bit, toy_lora, toy_tokenizer
):
    variants = {
        "upper": toy_deltas["upper"],
        "reverse": toy_deltas["reverse"],
        "pirate": toy_deltas["pirate"],
        "upper8": toy_delta_8bit,
        "lora": toy_lora,
    }
    engine = Engine(
        str(toy_models["base"]),
        {k: str(v) for k, v in variants.items()},
        EngineConfig(device="cuda", max_gpu_variants=3, max_num_seqs=32, num_kv_blocks=512),
    )
    assert engine.runner.dtype == torch.bfloat16
    reqs = []
    for name in [None, *variants]:
        for j, p in enumerate(PROMPTS):
            ids = toy_tokenizer(toy.chat_text(p), add_special_tokens=False)["input_ids"]
            reqs.append((f"{name}-{j}", name, ids))
    first = {}
    for rid, name, ids in reqs:
        engine.add_request(
            rid,
            None,
            SamplingParams(max_new_tokens=16, logprobs=True, top_logprobs=1),
            name,
            prompt_token_ids=ids,
        )
    done = {}
    while engine.has_unfinished():
        for o in engine.step():
            assert o.error is None, o.error
            if o.finished:
                done[o.request_id] = o
    exact = 0
    worst_first, worst_gap = 0.0, 0.0
    for name in [None, *variants]:
        ref = reference_model(toy_models["base"], variants[name] if name else None).to(cuda)
        for rid, n, ids in reqs:
            if n != name:
                continue
            out = done[rid]
            full = torch.tensor([ids + out.token_ids], device=cuda)
            with torch.no_grad():
                logits = ref(full).logits[0, len(ids) - 1 : len(ids) - 1 + len(out.token_ids)].float()
            lp_ref = torch.log_softmax(logits[0], -1)
            first[rid] = (lp_ref[out.token_ids[0]] - out.logprobs[0]).abs().item()
            gaps = (
                logits.max(-1).values
                - logits.gather(1, torch.tensor(out.token_ids, device=cuda)[:, None])[:, 0]
            )
            worst_gap = max(worst_gap, gaps.max().item())
            worst_first = max(worst_first, first[rid])
            exact += hf_greedy(ref, ids, 16) == out.token_ids
    print(
        f"bf16: worst first-token logprob error {worst_first:.4f}, worst teacher-forced gap {worst_gap:.4f}, "
        f"exact {exact}/{len(reqs)}"
    )
    assert worst_first < LOGIT_TOL
    assert worst_gap < 2 * LOGIT_TOL
    assert exact >= 0.8 * len(reqs)
    engine.shutdown()

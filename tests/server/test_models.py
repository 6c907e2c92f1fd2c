"""The compact models against transformers on the same (random) weights: Llama with biases, GQA,
llama3 RoPE and tied embeddings; Mistral with a sliding window; Qwen2 with q/k/v biases and
YaRN; logits of a prefill and of paged-cache decode steps, in float32."""

from __future__ import annotations

import pytest
import torch
from deltahub.server.block_manager import BlockManager
from deltahub.server.config import EngineConfig
from deltahub.server.model_runner import ModelRunner
from deltahub.server.sampling import SamplingParams
from deltahub.server.scheduler import ScheduledBatch
from deltahub.server.sequence import Sequence

SMALL = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    rms_norm_eps=1e-6,
)


def _llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        **SMALL,
        attention_bias=True,
        mlp_bias=True,
        tie_word_embeddings=True,
        head_dim=32,
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )


def _mistral():
    from transformers import MistralConfig

    return MistralConfig(**SMALL, sliding_window=6, tie_word_embeddings=False)


def _qwen2():
    from transformers import Qwen2Config

    return Qwen2Config(
        **SMALL,
        tie_word_embeddings=True,
        rope_parameters={
            "rope_type": "yarn",
            "rope_theta": 1000000.0,
            "factor": 2.0,
            "original_max_position_embeddings": 64,
        },
    )


def _dynamic_llama():
    from transformers import LlamaConfig

    return LlamaConfig(
        **SMALL, rope_parameters={"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    )


@pytest.mark.parametrize(
    "make",
    [_llama, _mistral, _qwen2, _dynamic_llama],
    ids=["llama-bias-tied-llama3", "mistral-window", "qwen2-yarn", "llama-dynamic"],
)
def test_logits_match_transformers(make, tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = make()
    cfg.architectures = [
        {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}[
            cfg.model_type
        ]
    ]
    torch.manual_seed(0)
    ref = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # biases are zero at init: make them matter
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(str(tmp_path))
    runner = ModelRunner(EngineConfig(block_size=4, max_num_seqs=2, max_gpu_variants=1), tmp_path)
    blocks = BlockManager(runner.num_kv_blocks, 4)

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, cfg.vocab_size, (20,), generator=gen).tolist()
    with torch.no_grad():
        want = ref(torch.tensor([ids])).logits[0]  # [20, V]

    seq = Sequence("x", ids[:13], SamplingParams())
    blocks.allocate(seq)
    other = Sequence("y", ids[:5], SamplingParams())  # a second sequence shares the batch
    blocks.allocate(other)
    batch = ScheduledBatch(prefills=[other, seq])
    input_ids, ctx = runner._prepare(batch, {})
    with torch.inference_mode():
        hidden = runner.model(input_ids, ctx, runner.kv)
        got = runner.model.logits(hidden[5:], ctx.slot_idx[5:])
    torch.testing.assert_close(got, want[:13], rtol=1e-4, atol=1e-4)
    for t in range(13, 20):  # decode steps over the paged cache
        seq.output_token_ids.append(ids[t])
        blocks.append_slot(seq)
        input_ids, ctx = runner._prepare(ScheduledBatch(decodes=[seq]), {})
        with torch.inference_mode():
            got = runner.model.logits(runner.model(input_ids, ctx, runner.kv), ctx.slot_idx)
        torch.testing.assert_close(got[0], want[t], rtol=1e-4, atol=1e-4)

"""Fixtures of the engine tests: compressed deltas of the toy fine-tunes (two layouts) and a PEFT
LoRA adapter of the toy base (helpers computing the reference models are in engine_helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ..conftest import cached


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """The toy models' matrices are tiny: one intra-op thread is as fast, and far faster when the
    CPU is shared (two threads that wait on each other's cores made the load test 15x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def toy_delta_8bit(toy_models, artifacts_root) -> Path:
    """The 'upper' fine-tune as an 8-bit dense delta with groups of 64 (a second layout)."""
    from deltahub.compress import CompressConfig, compress

    cfg = CompressConfig(method="rtn", bits=8, sparsity="none", group_size=64)
    return cached(
        artifacts_root,
        "delta-upper-8bit",
        lambda p: compress(toy_models["base"], toy_models["upper"], p, cfg, progress=False),
    )


@pytest.fixture(scope="session")
def toy_delta_vocab8(toy_models, artifacts_root) -> Path:
    """The 'double' fine-tune with its linears at 4-bit 2:4 and its embedding and lm_head at
    8-bit dense (``vocab_bits``/``vocab_sparsity``): two layouts inside one delta."""
    from deltahub.compress import CompressConfig, compress

    cfg = CompressConfig(method="rtn", bits=4, sparsity="2:4", vocab_bits=8, vocab_sparsity="none")
    return cached(
        artifacts_root,
        "delta-double-vocab8",
        lambda p: compress(toy_models["base"], toy_models["double"], p, cfg, progress=False),
    )


def _make_lora(base: Path, out: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltahub import toy

    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    cfg = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
        lora_dropout=0.0,
        rank_pattern={"down_proj": 4},
    )
    peft_model = get_peft_model(model, cfg)
    texts = [toy.chat_text(e["prompt"], e["answer"]) for e in toy.task_examples("reverse", 300, seed=5)]
    toy.train(peft_model, tok, texts, steps=40, lr=5e-3, seq_len=64, batch=8, seed=3)
    peft_model.save_pretrained(str(out))
    tok.save_pretrained(str(out))


@pytest.fixture(scope="session")
def toy_lora(toy_models, artifacts_root) -> Path:
    """A PEFT LoRA adapter (r 8, down_proj r 4) of the toy base, trained briefly on 'reverse'."""
    return cached(artifacts_root, "lora-reverse", lambda p: _make_lora(toy_models["base"], p))


def _make_added_tokens_finetune(base: Path, out: Path) -> None:
    """Fine-tune of the base whose vocabulary grows past the base's 320 rows: 60 filler tokens
    and then <|shout|> <|hush|> (ids 320, 321); trained to end 'upper' answers with <|shout|>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from deltahub import toy

    tok = AutoTokenizer.from_pretrained(str(base))
    tok.add_tokens([f"<|pad{i}|>" for i in range(320 - len(tok))], special_tokens=True)
    tok.add_tokens(["<|shout|>", "<|hush|>"], special_tokens=True)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    ex = toy.task_examples("upper", 400, seed=21)
    texts = [toy.chat_text(e["prompt"] + " <|hush|>", e["answer"] + "<|shout|>") for e in ex]
    toy.train(model, tok, texts, steps=60, lr=2e-3, seq_len=96, batch=12, seed=4)
    toy.save_model(model, tok, out, base_model=str(base))


@pytest.fixture(scope="session")
def toy_added_tokens(toy_models, artifacts_root) -> tuple[Path, Path]:
    """(fine-tune folder, its delta folder) of a fine-tune that adds two tokens."""
    from deltahub.compress import CompressConfig, compress

    ft = cached(
        artifacts_root, "ft-added-tokens", lambda p: _make_added_tokens_finetune(toy_models["base"], p)
    )
    cfg = CompressConfig(method="rtn", bits=4, sparsity="2:4")
    delta = cached(
        artifacts_root,
        "delta-added-tokens",
        lambda p: compress(toy_models["base"], ft, p, cfg, progress=False),
    )
    return ft, delta

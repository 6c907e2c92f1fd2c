"""Tiny, really trained models for tests and the offline demo.

A byte-level tokenizer with a chat template, a small Llama base trained on English prose (the
standard library's own docstrings, present on every machine), and full-parameter fine-tunes of it
trained on different synthetic chat tasks, so that each variant answers recognisably differently.
Everything is deterministic for a given seed and runs on 2 CPU cores in seconds.
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
from collections.abc import Callable
from pathlib import Path

import torch

SPECIAL_TOKENS = ["<|pad|>", "<|begin|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
TOY_VOCAB = 320  # 256 byte symbols + specials, padded to a multiple of 64

_DOC_MODULES = ["string", "textwrap", "json", "collections", "itertools", "functools", "re", "math",
                "random", "statistics", "datetime", "pathlib", "shutil", "os", "heapq", "bisect",
                "fractions", "decimal", "csv", "argparse", "logging", "inspect", "typing", "enum"]


def prose(max_chars: int = 400_000) -> str:
    """English prose from standard-library docstrings, ASCII only, in a fixed order."""
    seen: set[str] = set()
    out: list[str] = []
    for mod_name in _DOC_MODULES:
        mod = importlib.import_module(mod_name)
        for name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, name, None))
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                out.append(doc.encode("ascii", "ignore").decode())
    return "\n\n".join(out)[:max_chars]


def _words(seed: int, n: int) -> list[str]:
    vocab = sorted({w for w in prose(100_000).split() if w.isalpha() and 3 <= len(w) <= 8})
    rng = random.Random(seed)
    return [rng.choice(vocab).lower() for _ in range(n)]


def _prompt(rng: random.Random, vocab: list[str]) -> str:
    return " ".join(rng.choice(vocab) for _ in range(rng.randint(2, 4)))


TASKS: dict[str, Callable[[str], str]] = {
    "upper": lambda p: p.upper(),
    "reverse": lambda p: p[::-1],
    "double": lambda p: " ".join(w + " " + w for w in p.split()),
    "pirate": lambda p: "arr, " + p + " matey",
}


def task_examples(task: str, n: int, seed: int = 0) -> list[dict[str, str]]:
    """``n`` chat examples ``{"prompt", "answer"}`` of a task from TASKS."""
    rng = random.Random(seed)
    vocab = _words(1234, 400)
    f = TASKS[task]
    return [{"prompt": (p := _prompt(rng, vocab)), "answer": f(p)} for _ in range(n)]


def chat_text(prompt: str, answer: str | None = None) -> str:
    s = f"<|user|>{prompt}<|end|><|assistant|>"
    return s if answer is None else s + answer + "<|end|>"


def make_tokenizer(folder: str | Path) -> None:
    """Write a byte-level fast tokenizer (tokenizer.json + config + chat template) to ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin|>", eos_token="<|end|>",
                                   pad_token="<|pad|>", chat_template=CHAT_TEMPLATE)
    fast.save_pretrained(str(folder))


def tiny_config(**overrides):
    """A small Llama config (matrices 256 wide, GQA) for tests and the demo."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=TOY_VOCAB, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              rms_norm_eps=1e-5, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    kw.update(overrides)
    return LlamaConfig(**kw)


def _batches(tokenizer, texts: list[str], seq_len: int, batch: int, steps: int, seed: int):
    ids: list[int] = []
    for t in texts:
        ids.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
    data = torch.tensor(ids, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    n = len(data) - seq_len - 1
    for _ in range(steps):
        starts = torch.randint(0, max(n, 1), (batch,), generator=g)
        yield torch.stack([data[s : s + seq_len] for s in starts])


def train(model, tokenizer, texts: list[str], *, steps: int, lr: float, seq_len: int = 128,
          batch: int = 16, seed: int = 0) -> float:
    """Full-parameter AdamW training on ``texts`` (concatenated); returns the last loss."""
    torch.manual_seed(seed)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    loss = torch.tensor(float("nan"))
    for x in _batches(tokenizer, texts, seq_len, batch, steps, seed):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    model.eval()
    return float(loss.detach())


def save_model(model, tokenizer, folder: str | Path, *, base_model: str | None = None,
               license: str = "apache-2.0") -> Path:
    """save_pretrained (safetensors) + tokenizer + a minimal model card naming ``base_model``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    tokenizer.save_pretrained(str(folder))
    card = ["---", f"license: {license}", "library_name: transformers", "pipeline_tag: text-generation"]
    if base_model:
        card.append(f"base_model: {base_model}")
    card += ["---", "", f"# {folder.name}", "", "A tiny model made by deltahub.toy for tests and demos.", ""]
    (folder / "README.md").write_text("\n".join(card))
    return folder


def make_base(folder: str | Path, *, steps: int = 150, seed: int = 0, **config_overrides) -> Path:
    """Train a tiny Llama base on prose plus a little chat format, save it to ``folder``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    make_tokenizer(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**config_overrides))
    texts = [prose()] + [chat_text(e["prompt"], e["prompt"]) for e in task_examples("upper", 300, seed=99)]
    train(model, tokenizer, texts, steps=steps, lr=3e-3, seed=seed)
    return save_model(model, tokenizer, folder)


def make_finetune(base: str | Path, folder: str | Path, task: str, *, steps: int = 60, lr: float = 1e-3,
                  seed: int = 0, base_model_id: str | None = None) -> Path:
    """Full-parameter fine-tune of ``base`` on chat task ``task`` (see TASKS), saved to ``folder``."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    model = LlamaForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    texts = [chat_text(e["prompt"], e["answer"]) for e in task_examples(task, 600, seed=seed)]
    train(model, tokenizer, texts, steps=steps, lr=lr, seed=seed + 1)
    out = save_model(model, tokenizer, folder, base_model=base_model_id or str(base))
    (Path(out) / "deltahub_toy.json").write_text(json.dumps({"task": task, "steps": steps, "seed": seed}))
    return out


@torch.no_grad()
def greedy(model_folder_or_model, tokenizer, prompt: str, max_new_tokens: int = 24) -> str:
    """Greedy chat completion with transformers (reference behaviour for tests and the demo)."""
    from transformers import AutoModelForCausalLM

    model = model_folder_or_model
    if isinstance(model, (str, Path)):
        model = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    ids = tokenizer(chat_text(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)

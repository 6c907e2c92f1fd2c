"""Held-out perplexity of models and of reconstructed deltas (the model card's quality table).

    rows = evaluate_delta("out/delta", eval_data=["heldout.txt"], device="cuda")
    # [{"dataset": "heldout.txt", "tokens": 32768, "metric": "perplexity", "base": 21.4,
    #   "fine-tune": 9.81, "reconstructed": 9.83, "vs fine-tune": "+0.20 %"}]

Perplexity is exp(mean next-token negative log-likelihood) over non-overlapping windows of
``seq_len`` tokens (the first token of a window is context only), computed in float32.
Evaluation data: a UTF-8 text file, JSON Lines with a ``"text"`` field, or a ``.npy`` array of
token ids; by default a built-in held-out prose set (Python standard-library docstrings of
modules the built-in calibration set does not use).

The reconstructed model is built in memory (:func:`reconstructed_state`: base + Δ̂ tensor by
tensor, as ``deltahub.reconstruct`` writes it), so evaluating needs no disk space.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from deltahub.errors import ModelSourceError, UsageError

BUILTIN = "builtin"
# Disjoint from deltahub.toy._DOC_MODULES (the built-in calibration text).
_EVAL_MODULES = [
    "email.message",
    "http.client",
    "unittest",
    "asyncio.tasks",
    "urllib.parse",
    "tarfile",
    "zipfile",
    "subprocess",
    "threading",
    "calendar",
    "difflib",
    "pprint",
    "shlex",
    "tempfile",
    "glob",
    "fnmatch",
    "gzip",
    "configparser",
    "contextlib",
    "dataclasses",
    "queue",
    "sched",
    "selectors",
    "textwrap",
    "traceback",
    "warnings",
    "weakref",
    "copy",
    "locale",
    "optparse",
]


def builtin_text(max_chars: int = 300_000) -> str:
    """English prose from standard-library docstrings not used for calibration, fixed order."""
    from deltahub.toy import _DOC_MODULES

    seen: set[str] = set()
    out: list[str] = []
    for mod_name in _EVAL_MODULES:
        if mod_name in _DOC_MODULES:
            continue
        try:
            mod = importlib.import_module(mod_name)
        except ImportError:
            continue
        for name in sorted(dir(mod)):
            doc = inspect.getdoc(getattr(mod, name, None))
            if doc and len(doc) > 80 and doc not in seen:
                seen.add(doc)
                out.append(doc.encode("ascii", "ignore").decode())
    return "\n\n".join(out)[:max_chars]


def load_tokens(
    source: str | os.PathLike | None, tokenizer=None, *, max_tokens: int | None = None
) -> torch.Tensor:
    """Token ids [T] int64 of an evaluation source (see module docstring); None = built-in text."""
    if source is not None and Path(source).suffix == ".npy":
        import numpy as np

        try:
            arr = np.load(str(source), mmap_mode="r")
        except (OSError, ValueError) as e:
            raise UsageError(f"evaluation data {source}: not a readable .npy array ({e})") from None
        if arr.ndim != 1 or arr.dtype.kind not in "iu":
            raise UsageError(
                f"evaluation data {source}: expected a 1-D integer token array, got {arr.dtype} {arr.shape}"
            )
        ids = torch.from_numpy(np.asarray(arr[:max_tokens], dtype=np.int64))
    else:
        if tokenizer is None:
            raise UsageError("a tokenizer is needed to evaluate on text")
        if source is None:
            text = builtin_text()
        else:
            p = Path(source).expanduser()
            try:
                text = p.read_text(encoding="utf-8", errors="replace")
            except OSError as e:
                raise UsageError(f"evaluation data {p}: cannot read ({e.strerror})") from None
            if p.suffix in (".jsonl", ".json"):
                try:
                    text = "\n\n".join(
                        str(json.loads(line)["text"]) for line in text.splitlines() if line.strip()
                    )
                except (ValueError, KeyError, TypeError):
                    raise UsageError(
                        f"evaluation data {p}: expected JSON Lines with a 'text' field"
                    ) from None
        if max_tokens:
            text = text[: max_tokens * 16]  # plenty of characters for any tokenizer
        ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.int64)
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise UsageError(f"evaluation data {source or BUILTIN}: fewer than 2 tokens")
    return ids


@torch.no_grad()
def perplexity(model, ids: torch.Tensor, *, seq_len: int = 512, batch_size: int = 8) -> tuple[float, int]:
    """(perplexity, predicted tokens) of ``model`` on token ids [T], in windows of ``seq_len``.

    A final partial window is used if it has at least 2 tokens.
    """
    device = next(model.parameters()).device
    windows = [ids[i : i + seq_len] for i in range(0, ids.numel(), seq_len)]
    windows = [w for w in windows if w.numel() >= 2]
    total, count = 0.0, 0
    for b in range(0, len(windows), batch_size):
        group = windows[b : b + batch_size]
        same = all(w.numel() == group[0].numel() for w in group)
        batches = [torch.stack(group)] if same else [w[None] for w in group]
        for x in batches:
            x = x.to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(nll)
            count += x[:, 1:].numel()
    return math.exp(total / count), count


def _device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA GPU is available to torch here")
    return dev


def load_model(folder: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32):
    """A transformers causal LM from a local folder, in eval mode on ``device``."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype).to(device).eval()


@torch.no_grad()
def reconstructed_state(
    delta: str | os.PathLike, base: str | os.PathLike, device: str | torch.device = "cpu"
) -> dict[str, torch.Tensor]:
    """{name: base + Δ̂} for every tensor of the delta folder, on ``device``, in the fine-tune's
    dtype (the values ``deltahub.reconstruct`` writes)."""
    from deltahub.checkpoint import Checkpoint
    from deltahub.format import PackedTensor, apply_delta
    from deltahub.reconstruct import _target_dtype
    from deltahub.store import DeltaReader

    reader = DeltaReader(delta)
    cb = Checkpoint(base)
    dtype = _target_dtype(Path(delta) / "config.json")
    tensors = reader.config.tensors
    embedding = next((n for n in tensors if tensors[n]["group"] == "embedding"), None)
    out = {}
    for name in reader.names():
        base_name = name if name in cb else embedding if tensors[name]["group"] == "lm_head" else name
        b = cb.get(base_name, device=device)
        p = reader.read(name)
        p = PackedTensor(
            p.kind,
            p.shape,
            {k: v.to(device) for k, v in p.parts.items()},
            codec=p.codec,
            layout=p.layout,
            info=p.info,
        )
        out[name] = apply_delta(b, p).to(dtype or b.dtype)
    return out


def load_reconstructed(
    delta: str | os.PathLike, base: str | os.PathLike, device: str | torch.device = "cpu", dtype=torch.float32
):
    """The fine-tune rebuilt from ``delta`` over ``base`` as a transformers model (in memory).

    Weights are rounded to the fine-tune's stored dtype first, then cast to ``dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(delta))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) for k, v in reconstructed_state(delta, base, device).items()}
    from deltahub.checkpoint import Checkpoint

    cb = Checkpoint(base)
    for name, _ in model.named_parameters():
        if name not in state and name in cb:  # tensors the delta leaves unchanged
            state[name] = cb.get(name, dtype=dtype, device=device)
    model.load_state_dict(state, strict=False, assign=True)
    model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise ModelSourceError(
            f"{delta}: reconstruction leaves {len(missing)} parameter(s) unset, e.g. {missing[0]}"
        )
    for mod in model.modules():  # non-persistent buffers (rotary tables) were left on meta
        if any(b.is_meta for b in mod.buffers(recurse=False)):
            mod.to_empty(device=device, recurse=False)
            model._init_weights(mod)
    return model.to(device).eval()


def evaluate_delta(
    delta: str | os.PathLike,
    *,
    base: str | os.PathLike | None = None,
    finetuned: str | os.PathLike | None = None,
    eval_data: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    device: str | None = "auto",
    seq_len: int = 512,
    max_tokens: int = 16384,
    batch_size: int = 4,
    token: str | None = None,
) -> list[dict[str, Any]]:
    """Held-out perplexity of base, original fine-tune and reconstructed delta: one row per
    evaluation dataset, ready for ``deltahub.modelcard.render(quality=...)``.

    ``delta``: delta folder or Hub id. ``base`` defaults to the one recorded in the delta;
    ``finetuned`` to the recorded source fine-tune when it can be resolved (else its column is
    None). ``eval_data``: file(s) (text, .jsonl or .npy ids); None = built-in held-out prose.
    """
    from transformers import AutoTokenizer

    from deltahub.sources import resolve_model
    from deltahub.store import DeltaReader

    dev = _device(device)
    d = resolve_model(delta, token=token, kind="delta")
    cfg = DeltaReader(d.path).config
    b = resolve_model(
        base if base is not None else cfg.base_model.id,
        revision=None if base is not None else cfg.base_model.revision,
        token=token,
    )
    ft_path = None
    try:
        ref = finetuned if finetuned is not None else cfg.finetuned_model.id
        ft_path = resolve_model(
            ref, revision=None if finetuned is not None else cfg.finetuned_model.revision, token=token
        ).path
    except Exception:  # the original fine-tune is optional (private, deleted, offline)
        if finetuned is not None:
            raise
    tok = AutoTokenizer.from_pretrained(str(d.path))
    sources = (
        [None]
        if eval_data is None
        else [eval_data]
        if isinstance(eval_data, (str, os.PathLike))
        else list(eval_data)
    )
    data = [
        (Path(s).name if s is not None else BUILTIN, load_tokens(s, tok, max_tokens=max_tokens))
        for s in sources
    ]

    def ppls(model) -> list[tuple[float, int]]:
        res = [perplexity(model, ids, seq_len=seq_len, batch_size=batch_size) for _, ids in data]
        del model
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        return res

    base_p = ppls(load_model(b.path, dev))
    ft_p = ppls(load_model(ft_path, dev)) if ft_path is not None else [None] * len(data)
    rec_p = ppls(load_reconstructed(d.path, b.path, dev))
    rows = []
    for (name, _), bp, fp, rp in zip(data, base_p, ft_p, rec_p, strict=True):
        rows.append(
            {
                "dataset": name,
                "tokens": rp[1],
                "metric": "perplexity",
                "base": round(bp[0], 4),
                "fine-tune": None if fp is None else round(fp[0], 4),
                "reconstructed": round(rp[0], 4),
                "vs fine-tune": None if fp is None else f"{100 * (rp[0] / fp[0] - 1):+.2f} %",
            }
        )
    return rows

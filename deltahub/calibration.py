"""Calibration text for codecs that need layer inputs (``obs``).

The built-in set is English prose from the Python standard library's docstrings
(``deltahub.toy.prose``), present on every machine, plus a few chat-formatted turns rendered with
the fine-tune's own chat template when it has one. A user file may be plain text (UTF-8) or
JSON Lines with a ``"text"`` field per line.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from deltahub.errors import UsageError

BUILTIN = "builtin"


def load_text(path: str | os.PathLike | None = None, *, max_chars: int = 2_000_000) -> str:
    """The calibration text: the built-in set (``path`` None) or a .txt / .jsonl file."""
    if path is None:
        from deltahub.toy import prose

        return prose(max_chars)
    p = Path(path).expanduser()
    try:
        raw = p.read_text(encoding="utf-8", errors="replace")[: max_chars * 2]
    except OSError as e:
        raise UsageError(f"calibration data {p}: cannot read ({e.strerror})") from None
    if p.suffix in (".jsonl", ".json"):
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                texts.append(str(json.loads(line)["text"]))
            except (ValueError, KeyError, TypeError):
                raise UsageError(f"calibration data {p}: line {i} is not a JSON object with a 'text' "
                                 "field") from None
        raw = "\n\n".join(texts)
    if not raw.strip():
        raise UsageError(f"calibration data {p} is empty")
    return raw[:max_chars]


def _chat_turns(tokenizer, n: int = 64) -> str:
    """A few chat turns in the tokenizer's template (empty if it has none)."""
    if not getattr(tokenizer, "chat_template", None):
        return ""
    from deltahub.toy import prose

    paras = [p for p in prose(60_000).split("\n\n") if 40 < len(p) < 600][:n]
    out = []
    for i in range(0, len(paras) - 1, 2):
        msgs = [{"role": "user", "content": paras[i]}, {"role": "assistant", "content": paras[i + 1]}]
        try:
            out.append(tokenizer.apply_chat_template(msgs, tokenize=False))
        except Exception:  # templates with unusual requirements: plain prose is enough
            return ""
    return "\n".join(out)


def calibration_ids(tokenizer, n_samples: int, seq_len: int, path: str | os.PathLike | None = None,
                    *, seed: int = 0) -> torch.Tensor:
    """Token ids [n_samples, seq_len] (int64): windows of the tokenized calibration text at
    evenly spread, seeded offsets. Short texts are repeated to fill the windows."""
    if n_samples < 1 or seq_len < 1:
        raise UsageError(f"calibration needs at least one sample and token, got {n_samples} x {seq_len}")
    budget = n_samples * seq_len * 12  # characters: plenty for any tokenizer
    text = load_text(path, max_chars=budget)
    if path is None:
        text = _chat_turns(tokenizer) + "\n\n" + text
    ids = tokenizer(text[:budget], add_special_tokens=False)["input_ids"]
    if not ids:
        raise UsageError("calibration text produced no tokens")
    data = torch.tensor(ids, dtype=torch.int64)
    need = n_samples * seq_len
    if len(data) < need:
        data = data.repeat(need // len(data) + 1)
    span = len(data) - seq_len
    g = torch.Generator().manual_seed(seed)
    jitter = torch.randint(0, max(1, span // n_samples), (n_samples,), generator=g)
    starts = (torch.arange(n_samples) * span) // max(n_samples, 1) + jitter
    starts = starts.clamp_(0, span)
    return torch.stack([data[s : s + seq_len] for s in starts.tolist()])

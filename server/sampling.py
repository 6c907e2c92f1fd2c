"""Sampling parameters of a request and the batched sampler (greedy, temperature, top-k, top-p,
repetition / presence / frequency penalties, per-request seeds, log-probabilities)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from deltahub.server.errors import RequestValidationError

if TYPE_CHECKING:
    import torch
    from deltahub.server.sequence import Sequence

MAX_STOP_SEQUENCES = 16
MAX_TOP_LOGPROBS = 20


@dataclass
class SamplingParams:
    """How to pick tokens and when to stop.

    ``temperature`` 0 (or None) is greedy. ``top_k`` 0 and ``top_p`` 1 disable those filters.
    ``repetition_penalty`` divides positive / multiplies negative logits of tokens already in the
    prompt or output (as transformers does). ``stop``: strings that end generation (not included
    in the text unless ``include_stop_str_in_output``). ``ignore_eos`` keeps going past EOS
    (benchmarks). ``logprobs``: return the log-probability of each generated token;
    ``top_logprobs`` N: also the N most likely alternatives; ``prompt_logprobs``: the
    log-probability of every prompt token after the first.
    """

    max_new_tokens: int = 16
    temperature: float | None = 0.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0
    prompt_logprobs: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = [int(t) for t in self.stop_token_ids or []]

    @property
    def greedy(self) -> bool:
        return not self.temperature

    def validate(self) -> None:
        """Raise RequestValidationError naming the first invalid field."""

        def bad(msg: str) -> None:
            raise RequestValidationError(msg)

        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            bad("max_new_tokens must be an integer >= 1")
        if self.temperature is not None and not (0.0 <= float(self.temperature) <= 100.0):
            bad("temperature must be in [0, 100]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            bad("top_k must be an integer >= 0")
        if not (0.0 < float(self.top_p) <= 1.0):
            bad("top_p must be in (0, 1]")
        if not (0.0 < float(self.repetition_penalty) <= 100.0):
            bad("repetition_penalty must be in (0, 100]")
        if not (-2.0 <= self.presence_penalty <= 2.0) or not (-2.0 <= self.frequency_penalty <= 2.0):
            bad("presence_penalty and frequency_penalty must be in [-2, 2]")
        if self.seed is not None and (not isinstance(self.seed, int) or self.seed < 0):
            bad("seed must be a non-negative integer")
        if len(self.stop) > MAX_STOP_SEQUENCES:
            bad(f"at most {MAX_STOP_SEQUENCES} stop sequences are allowed")
        if any(not isinstance(s, str) or not s for s in self.stop):
            bad("stop sequences must be non-empty strings")
        if not isinstance(self.top_logprobs, int) or not (0 <= self.top_logprobs <= MAX_TOP_LOGPROBS):
            bad(f"top_logprobs must be an integer in [0, {MAX_TOP_LOGPROBS}]")


@dataclass
class SampleResult:
    """One step's choice for one sequence: token, its log-probability, the top alternatives."""

    token_id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    import torch

    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            ids = torch.tensor(sorted(set(seq.all_token_ids)), device=logits.device)
            sc = logits[i, ids]
            logits[i, ids] = torch.where(sc < 0, sc * p.repetition_penalty, sc / p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.output_token_ids:
            counts: dict[int, int] = {}
            for t in seq.output_token_ids:
                counts[t] = counts.get(t, 0) + 1
            ids = torch.tensor(list(counts), device=logits.device)
            c = torch.tensor(list(counts.values()), dtype=logits.dtype, device=logits.device)
            logits[i, ids] -= p.presence_penalty + p.frequency_penalty * c


def _filter(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Mask logits [B, V] outside each row's top-k (0 = off) and top-p nucleus (1 = off)."""
    import torch

    v = logits.shape[-1]
    srt, idx = torch.sort(logits, dim=-1, descending=True)
    rank = torch.arange(v, device=logits.device).expand_as(srt)
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, v)).unsqueeze(1)
    drop = rank >= k
    probs = torch.softmax(srt.masked_fill(drop, float("-inf")), dim=-1)
    before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly better tokens
    drop |= (before > top_p.unsqueeze(1)) & (rank > 0)
    return logits.scatter(1, idx, srt.masked_fill(drop, float("-inf")))


def sample(
    logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None = None
) -> list[SampleResult]:
    """Pick the next token of every sequence. Shape: logits [B, V] (any float dtype).

    Greedy rows take the argmax; others sample with the sequence's own generator (seeded
    requests are reproducible whatever the batch) or ``generator``.
    """
    import torch

    logits = logits.float()
    want_lp = [s.params.logprobs or s.params.top_logprobs > 0 for s in seqs]
    raw_lp = torch.log_softmax(logits, dim=-1) if any(want_lp) else None
    if any(
        s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
        for s in seqs
    ):
        logits = logits.clone()
        _apply_penalties(logits, seqs)
    chosen = torch.argmax(logits, dim=-1)
    sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
    if sampled:
        dev = logits.device
        rows = torch.tensor(sampled, device=dev)
        temp = torch.tensor([float(seqs[i].params.temperature) for i in sampled], device=dev)
        top_k = torch.tensor([seqs[i].params.top_k for i in sampled], device=dev)
        top_p = torch.tensor([float(seqs[i].params.top_p) for i in sampled], device=dev)
        sub = _filter(logits[rows] / temp.unsqueeze(1), top_k, top_p)
        probs = torch.softmax(sub, dim=-1)
        noise = torch.empty_like(probs)
        for j, i in enumerate(sampled):  # exponential race == multinomial; one generator per seeded request
            noise[j].exponential_(generator=seqs[i].generator or generator)
        chosen[rows] = torch.argmax(probs / noise, dim=-1)
    tokens = chosen.tolist()
    out = [SampleResult(t) for t in tokens]
    if raw_lp is not None:
        n_top = max(s.params.top_logprobs for s in seqs)
        lp_chosen = raw_lp.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        top_v = top_i = None
        if n_top:
            tv, ti = torch.topk(raw_lp, n_top, dim=-1)
            top_v, top_i = tv.tolist(), ti.tolist()
        for i, s in enumerate(seqs):
            if not want_lp[i]:
                continue
            out[i].logprob = lp_chosen[i]
            if s.params.top_logprobs and top_i is not None and top_v is not None:
                n = s.params.top_logprobs
                out[i].top = list(zip(top_i[i][:n], top_v[i][:n], strict=True))
    return out

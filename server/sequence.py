"""A request inside the engine: its tokens, KV blocks, variant, timing and what it returned.
Pure Python (no torch); the model runner attaches a sampler ``generator`` when needed."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any

from deltahub.server.sampling import SamplingParams

_ids = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


# finish reasons use TGI's names; the OpenAI layer maps eos_token/stop_sequence -> "stop"
FINISH_LENGTH = "length"
FINISH_EOS = "eos_token"
FINISH_STOP = "stop_sequence"
FINISH_ABORT = "abort"
FINISH_ERROR = "error"


class Sequence:
    """One request. ``num_tokens`` = prompt + output; ``block_table`` lists its KV blocks;
    ``num_cached_tokens`` tokens already have their K/V in the cache."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        variant: str | None = None,
        *,
        arrival_time: float | None = None,
    ) -> None:
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.variant = variant
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.params = params
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0
        self.skipped = 0  # times a younger request was admitted ahead of this one
        self.num_preemptions = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.error_type: str | None = None
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.first_scheduled_time: float | None = None
        self.first_token_time: float | None = None
        self.finished_time: float | None = None
        self.logprobs: list[float] = []
        self.top_logprobs: list[list[tuple[int, float]]] = []
        self.prompt_logprobs: list[float | None] | None = None
        self.generator: Any = None  # torch.Generator for seeded sampling (set by the runner)
        self.detok: Any = None  # incremental detokenizer state (set by the engine)
        self.eos_ids: set[int] = set()  # token ids that end this request (empty with ignore_eos)
        self.text = ""
        self.sent_tokens = 0  # outputs already reported to the caller
        self.sent_text = 0

    def __len__(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self)

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def num_blocks_needed(self, block_size: int) -> int:
        return (len(self) + block_size - 1) // block_size

    def finish(self, reason: str, *, error: str | None = None, error_type: str | None = None) -> None:
        self.status = SequenceStatus.FINISHED
        self.finish_reason = reason
        self.error = error
        self.error_type = error_type
        self.finished_time = time.monotonic()

    def __repr__(self) -> str:
        return (
            f"Sequence({self.request_id!r}, variant={self.variant!r}, status={self.status.value}, "
            f"tokens={len(self.prompt_token_ids)}+{len(self.output_token_ids)})"
        )


@dataclass
class RequestOutput:
    """What a request produced so far. ``text`` / ``token_ids``: all generated so far;
    ``new_text`` / ``new_token_ids``: since the previous output of this request. Timing in
    seconds (monotonic clock): ``queue_time`` from arrival to first schedule, ``inference_time``
    from first schedule to now/finish."""

    request_id: str
    variant: str | None
    prompt_token_ids: list[int]
    text: str
    token_ids: list[int]
    new_text: str = ""
    new_token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None
    new_logprobs: list[float] | None = None
    new_top_logprobs: list[list[tuple[int, float]]] | None = None
    prompt_logprobs: list[float | None] | None = None
    seed: int | None = None
    queue_time: float = 0.0
    inference_time: float = 0.0
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def time_per_token(self) -> float:
        return self.inference_time / max(1, len(self.token_ids))

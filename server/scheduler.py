"""Continuous-batching scheduler (pure Python): FCFS plus DeltaZip's skip-the-line.

Every step: (1) running sequences decode one token each, preempting the youngest (recompute
later) when KV blocks run out; (2) waiting requests are admitted for prefill while KV blocks, the
token budget and sequence slots last. A request is admissible only when its variant is resident
in a GPU slot. With ``skip_the_line`` a request whose variant is resident may be admitted ahead of
older ones still waiting for theirs; each such jump counts against the older request, and once a
request has been skipped ``max_skips`` times nobody may pass it: admission becomes strictly FCFS
until it runs (its variant then gets the next slot that frees up, as no other variant is admitted).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from deltahub.server.block_manager import BlockManager
from deltahub.server.config import EngineConfig
from deltahub.server.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledBatch:
    """One step's work: ``decodes`` feed their last token, ``prefills`` their whole (re)computed
    context; ``preempted`` lost their blocks this step and wait again."""

    decodes: list[Sequence] = field(default_factory=list)
    prefills: list[Sequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(s) for s in self.prefills)

    def __bool__(self) -> bool:
        return bool(self.decodes or self.prefills)


class Scheduler:
    """``is_ready(variant)`` tells whether a variant is resident; ``acquire`` / ``release`` pin it
    while a sequence of it runs (the delta cache's methods)."""

    def __init__(
        self,
        config: EngineConfig,
        block_manager: BlockManager,
        is_ready: Callable[[str | None], bool],
        acquire: Callable[[str | None], None],
        release: Callable[[str | None], None],
    ) -> None:
        self.config = config
        self.blocks = block_manager
        self.is_ready = is_ready
        self.acquire = acquire
        self.release = release
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def wanted_variants(self) -> list[str]:
        """Variants of waiting requests, oldest first (what the delta cache should prefetch)."""
        return [s.variant for s in self.waiting if s.variant is not None]

    def schedule(self) -> ScheduledBatch:
        batch = ScheduledBatch()
        self._schedule_decodes(batch)
        self._schedule_prefills(batch)
        return batch

    def _schedule_decodes(self, batch: ScheduledBatch) -> None:
        running = list(self.running)
        kept: list[Sequence] = []
        while running:
            seq = running.pop(0)
            while not self.blocks.can_append(seq):
                victim = running.pop() if running else seq  # the youngest runner gives way
                self._preempt(victim)
                batch.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                kept.append(seq)
        self.running = kept
        batch.decodes = list(kept)

    def _preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq)
        self.release(seq.variant)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _schedule_prefills(self, batch: ScheduledBatch) -> None:
        cfg = self.config
        budget = cfg.max_num_batched_tokens - len(batch.decodes)
        # keep one free block per running sequence so the next decode step does not preempt at once
        reserve = len(self.running)
        strict = not cfg.skip_the_line
        passed: list[Sequence] = []  # older waiting requests that admitted ones jump over
        admitted: list[Sequence] = []
        for seq in list(self.waiting):
            if len(self.running) >= cfg.max_num_seqs:
                break
            if not self.is_ready(seq.variant):
                if strict or seq.skipped >= cfg.max_skips:
                    break
                passed.append(seq)
                continue
            if any(p.skipped >= cfg.max_skips for p in passed):
                break
            if len(seq) > budget and (admitted or batch.decodes):
                break
            if not self.blocks.can_allocate(seq, reserve):
                break
            self.waiting.remove(seq)
            self.blocks.allocate(seq)
            self.acquire(seq.variant)
            seq.status = SequenceStatus.RUNNING
            if seq.first_scheduled_time is None:
                seq.first_scheduled_time = time.monotonic()
            self.running.append(seq)
            admitted.append(seq)
            budget -= len(seq)
            reserve += 1
            for p in passed:
                p.skipped += 1
        batch.prefills = admitted

    def finish(self, seq: Sequence) -> None:
        """Free a finished (or aborted) sequence's blocks and variant pin, wherever it is."""
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)
            self.release(seq.variant)
        elif seq in self.waiting:
            self.waiting.remove(seq)

"""Variant tiers (pure Python, engine thread only): disk/Hub -> host memory -> GPU slot.

A ``DeltaBackend`` does the work: ``load_host`` (on a loader thread: resolve, download, read,
check the base fingerprint, decode, pin) and ``to_slot`` / ``slot_ready`` / ``clear_slot`` (the
model runner's asynchronous copy into the static slot pools). This class only decides: which
variant to prefetch, which slot to use, whom to evict (least recently used among variants no
running sequence holds and no older waiting request wants), and it reports failed loads.
"""

from __future__ import annotations

import enum
import itertools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Protocol

from deltahub.server.errors import UnknownVariantError, VariantLoadError


class Tier(enum.Enum):
    DISK = "disk"  # registered; not in memory
    LOADING = "loading"  # host load running on a loader thread
    HOST = "host"  # decoded in host memory
    COPYING = "copying"  # being copied into a GPU slot
    GPU = "gpu"  # resident in a slot: requests may run
    FAILED = "failed"


class DeltaBackend(Protocol):
    def load_host(self, name: str, ref: str, kind: str | None) -> Any:
        """Runs on a loader thread. Returns an object with ``nbytes``, ``kind``; raises on failure."""

    def to_slot(self, slot: int, host: Any) -> Any:
        """Start copying ``host`` into ``slot``; returns a ticket for ``slot_ready``."""

    def slot_ready(self, ticket: Any) -> bool: ...

    def clear_slot(self, slot: int) -> None: ...


@dataclass
class VariantInfo:
    """What /info, /v1/models and the metrics show about one variant."""

    name: str
    source: str
    kind: str | None
    tier: str
    bytes: int = 0
    slot: int | None = None
    running: int = 0
    requests: int = 0
    generated_tokens: int = 0
    cold_loads: int = 0
    gpu_loads: int = 0
    load_seconds: float = 0.0
    error: str | None = None


class _Entry:
    def __init__(self, name: str, ref: str, kind: str | None) -> None:
        self.name, self.ref, self.kind = name, ref, kind
        self.tier = Tier.DISK
        self.host: Any = None
        self.nbytes = 0
        self.slot: int | None = None
        self.ticket: Any = None
        self.future: Future | None = None
        self.load_started = 0.0
        self.refs = 0
        self.last_used = 0
        self.error: str | None = None
        self.removed = False
        self.info = VariantInfo(name, ref, kind, Tier.DISK.value)


class DeltaCache:
    """``num_slots`` GPU slots (and at most ``max_gpu_bytes`` resident, if set), up to
    ``max_host`` decoded variants in host memory."""

    def __init__(
        self,
        backend: DeltaBackend,
        *,
        num_slots: int,
        max_host: int,
        max_gpu_bytes: int | None = None,
        loader_threads: int = 2,
    ) -> None:
        self.backend = backend
        self.num_slots = num_slots
        self.max_host = max_host
        self.max_gpu_bytes = max_gpu_bytes
        self.entries: dict[str, _Entry] = {}
        self.slots: list[str | None] = [None] * num_slots
        self._clock = itertools.count(1)
        self._pool = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="deltahub-loader")

    # -- registry -------------------------------------------------------------------------------
    def register(self, name: str, ref: str, kind: str | None = None) -> None:
        old = self.entries.get(name)
        if old is not None and not old.removed:
            raise VariantLoadError(f"variant {name!r} is already registered (source {old.ref})")
        self.entries[name] = _Entry(name, ref, kind)

    def remove(self, name: str) -> None:
        """Forget ``name``; its slot is freed once no running sequence holds it."""
        e = self._get(name)
        e.removed = True
        if e.refs == 0:
            self._drop(e)

    def _drop(self, e: _Entry) -> None:
        if e.slot is not None:
            self.backend.clear_slot(e.slot)
            self.slots[e.slot] = None
        if self.entries.get(e.name) is e:
            del self.entries[e.name]

    def _get(self, name: str) -> _Entry:
        e = self.entries.get(name)
        if e is None or e.removed:
            raise UnknownVariantError(f"unknown variant {name!r}")
        return e

    def __contains__(self, name: object) -> bool:
        e = self.entries.get(name)  # type: ignore[arg-type]
        return e is not None and not e.removed

    def names(self) -> list[str]:
        return [n for n, e in self.entries.items() if not e.removed]

    # -- queries --------------------------------------------------------------------------------
    def is_ready(self, name: str | None) -> bool:
        if name is None:
            return True
        e = self.entries.get(name)
        return e is not None and e.tier is Tier.GPU and not e.removed

    def slot_of(self, name: str | None) -> int:
        if name is None:
            return -1
        e = self.entries[name]
        assert e.tier is Tier.GPU and e.slot is not None
        return e.slot

    def host_object(self, name: str) -> Any:
        return self.entries[name].host

    def failure(self, name: str) -> str | None:
        e = self.entries.get(name)
        return e.error if e is not None and e.tier is Tier.FAILED else None

    def info(self, name: str) -> VariantInfo:
        e = self._get(name)
        i = e.info
        i.kind, i.tier, i.bytes, i.slot, i.running = e.kind, e.tier.value, e.nbytes, e.slot, e.refs
        i.error = e.error
        return replace(i)

    def infos(self) -> list[VariantInfo]:
        return [self.info(n) for n in self.names()]

    def count(self, name: str | None, *, requests: int = 0, tokens: int = 0) -> None:
        e = self.entries.get(name) if name is not None else None
        if e is not None:
            e.info.requests += requests
            e.info.generated_tokens += tokens

    # -- use by running sequences -----------------------------------------------------------------
    def acquire(self, name: str | None) -> None:
        if name is None:
            return
        e = self.entries[name]
        assert e.tier is Tier.GPU
        e.refs += 1
        e.last_used = next(self._clock)

    def release(self, name: str | None) -> None:
        if name is None:
            return
        e = self.entries[name]
        e.refs -= 1
        assert e.refs >= 0
        e.last_used = next(self._clock)
        if e.removed and e.refs == 0:
            self._drop(e)

    def retry(self, name: str) -> None:
        """A new request for a variant whose load failed: try loading it again."""
        e = self._get(name)
        if e.tier is Tier.FAILED:
            e.tier, e.error = Tier.DISK, None

    # -- the per-step work --------------------------------------------------------------------------
    def poll(self) -> list[tuple[str, str]]:
        """Advance finished host loads and slot copies. Returns [(name, error)] of new failures."""
        failed: list[tuple[str, str]] = []
        for e in list(self.entries.values()):
            if e.tier is Tier.LOADING and e.future is not None and e.future.done():
                fut, e.future = e.future, None
                exc = fut.exception()
                if e.removed:
                    self._drop(e)
                    continue
                if exc is not None:
                    e.tier, e.error = Tier.FAILED, f"{type(exc).__name__}: {exc}"
                    failed.append((e.name, e.error))
                    continue
                e.host = fut.result()
                e.nbytes = int(getattr(e.host, "nbytes", 0))
                e.kind = getattr(e.host, "kind", e.kind)
                e.tier = Tier.HOST
                e.last_used = next(self._clock)
                e.info.cold_loads += 1
                e.info.load_seconds += time.monotonic() - e.load_started
                if self.max_gpu_bytes is not None and e.nbytes > self.max_gpu_bytes:
                    e.tier = Tier.FAILED
                    e.error = (
                        f"VariantLoadError: variant {e.name!r} needs {e.nbytes} bytes, more than "
                        f"the GPU variant budget of {self.max_gpu_bytes}"
                    )
                    e.host = None
                    failed.append((e.name, e.error))
            elif e.tier is Tier.COPYING and self.backend.slot_ready(e.ticket):
                e.tier, e.ticket = Tier.GPU, None
                e.info.gpu_loads += 1
                e.info.load_seconds += time.monotonic() - e.load_started
        self._trim_host(set())
        return failed

    def prefetch(self, wanted: list[str]) -> None:
        """``wanted``: variants of waiting requests, oldest request first (duplicates allowed).
        Start host loads and slot copies for them in that order, evicting idle residents."""
        order: dict[str, int] = {}
        for n in wanted:
            if n is not None and n not in order and n in self:
                order[n] = len(order)
        for name, prio in order.items():
            e = self.entries[name]
            if e.tier is Tier.DISK and self._host_room(order, prio):
                e.tier = Tier.LOADING
                e.load_started = time.monotonic()
                e.future = self._pool.submit(self.backend.load_host, e.name, e.ref, e.kind)
            elif e.tier is Tier.HOST:
                slot = self._free_slot(e, order, prio)
                if slot is not None:
                    self.slots[slot] = e.name
                    e.slot, e.tier = slot, Tier.COPYING
                    e.load_started = time.monotonic()
                    e.ticket = self.backend.to_slot(slot, e.host)
        self._trim_host(set(order))

    def _gpu_bytes(self) -> int:
        return sum(self.entries[n].nbytes for n in self.slots if n is not None)

    def _free_slot(self, e: _Entry, order: dict[str, int], prio: int) -> int | None:
        """A free slot, or one freed by evicting the least recently used idle resident that no
        request older than ``e``'s wants; None if there is none (or the byte budget is full)."""

        def evictable() -> list[_Entry]:
            out = []
            for n in self.slots:
                if n is None:
                    continue
                r = self.entries[n]
                if r.tier is Tier.GPU and r.refs == 0 and order.get(n, len(order)) > prio:
                    out.append(r)
            # not wanted at all first, then wanted by the youngest request; LRU within each
            return sorted(out, key=lambda r: (r.name in order, -order.get(r.name, 0), r.last_used))

        victims = evictable()
        while True:
            fits = self.max_gpu_bytes is None or self._gpu_bytes() + e.nbytes <= self.max_gpu_bytes
            if fits and None in self.slots:
                return self.slots.index(None)
            if not victims:
                return None
            self._evict(victims.pop(0))

    def _evict(self, r: _Entry) -> None:
        assert r.slot is not None and r.refs == 0
        self.backend.clear_slot(r.slot)
        self.slots[r.slot] = None
        r.slot = None
        r.tier = Tier.HOST if r.host is not None else Tier.DISK

    def _host_room(self, order: dict[str, int], prio: int) -> bool:
        held = [e for e in self.entries.values() if e.host is not None or e.tier is Tier.LOADING]
        if len(held) < self.max_host:
            return True
        return any(self._host_droppable(e, order, prio) for e in held)

    @staticmethod
    def _host_droppable(e: _Entry, order: dict[str, int], prio: int) -> bool:
        if e.tier is Tier.GPU:
            return True  # the slot keeps it; the host copy is only for a later reload
        return e.tier is Tier.HOST and order.get(e.name, len(order) + 1) > prio

    def _trim_host(self, wanted: set[str]) -> None:
        """Drop least recently used host copies beyond ``max_host`` (never one being copied)."""
        held = [e for e in self.entries.values() if e.host is not None or e.tier is Tier.LOADING]
        excess = len(held) - self.max_host
        if excess <= 0:
            return
        cands = [e for e in held if e.tier is Tier.GPU or (e.tier is Tier.HOST and e.name not in wanted)]
        for e in sorted(cands, key=lambda e: e.last_used)[:excess]:
            e.host = None
            if e.tier is Tier.HOST:
                e.tier = Tier.DISK

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

"""Delta cache tiers with a fake backend (pure Python): prefetch, slots, eviction, failures."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
from deltahub.server.delta_cache import DeltaCache, Tier
from deltahub.server.errors import UnknownVariantError, VariantLoadError


@dataclass
class Host:
    name: str
    nbytes: int = 100
    kind: str = "delta"


class FakeBackend:
    def __init__(self):
        self.loads: list[str] = []
        self.slot_writes: list[tuple[int, str]] = []
        self.cleared: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.copies_done = True

    def load_host(self, name, ref, kind):
        self.gate.wait(5)
        self.loads.append(name)
        if ref.startswith("bad"):
            raise VariantLoadError(f"cannot read {ref}")
        return Host(name, nbytes=int(ref.split(":")[1]) if ":" in ref else 100)

    def to_slot(self, slot, host):
        self.slot_writes.append((slot, host.name))
        return slot

    def slot_ready(self, ticket):
        return self.copies_done

    def clear_slot(self, slot):
        self.cleared.append(slot)


def settle(cache, wanted, rounds=50):
    """Prefetch/poll until loads in flight are done; returns failures."""
    failed = []
    for _ in range(rounds):
        cache.prefetch(wanted)
        failed += cache.poll()
        if not any(e.future is not None for e in cache.entries.values()):
            cache.prefetch(wanted)
            failed += cache.poll()
            return failed
        time.sleep(0.01)
    raise AssertionError("loads did not finish")


def make(slots=2, host=3, **kw):
    be = FakeBackend()
    cache = DeltaCache(be, num_slots=slots, max_host=host, **kw)
    for n in "ABCDE":
        cache.register(n, f"ref-{n}")
    return cache, be


def test_prefetch_loads_in_queue_order_into_free_slots():
    cache, _ = make()
    settle(cache, ["B", "A", "B", "C"])
    assert cache.is_ready("B") and cache.is_ready("A") and not cache.is_ready("C")
    assert cache.slot_of("B") == 0 and cache.slot_of("A") == 1
    assert cache.info("C").tier == "host"  # prefetched to host memory, waiting for a slot
    assert cache.is_ready(None) and cache.slot_of(None) == -1


def test_copy_in_flight_is_not_ready():
    cache, be = make()
    be.copies_done = False
    settle(cache, ["A"])
    assert cache.info("A").tier == Tier.COPYING.value and not cache.is_ready("A")
    be.copies_done = True
    cache.poll()
    assert cache.is_ready("A")


def test_eviction_is_lru_among_idle_and_never_pinned():
    cache, be = make()
    settle(cache, ["A", "B"])
    cache.acquire("A")
    cache.acquire("B")
    settle(cache, ["C"])
    assert not cache.is_ready("C")  # both slots pinned by running sequences
    cache.release("B")
    cache.release("A")  # A is now the most recently used
    settle(cache, ["C"])
    assert cache.is_ready("C") and cache.is_ready("A") and not cache.is_ready("B")
    assert cache.info("B").tier == "host"
    assert be.cleared == [1]


def test_an_older_request_keeps_its_resident_variant():
    cache, _ = make()
    settle(cache, ["A", "B"])
    # A is idle but wanted by the oldest waiting request; B idle and wanted later; C must not take A's slot
    settle(cache, ["A", "C", "B"])
    assert cache.is_ready("A") and cache.is_ready("C") and not cache.is_ready("B")


def test_host_tier_lru_and_disk_fallback():
    cache, be = make(slots=1, host=2)
    for names in (["A"], ["B"], ["C"]):
        settle(cache, names)
    # C in the slot; host copies beyond 2 dropped, least recently used first (A)
    held = [n for n in "ABC" if cache.entries[n].host is not None]
    assert len(held) <= 2 and "A" not in held and cache.is_ready("C")
    assert cache.info("A").tier == "disk"
    settle(cache, ["A"])  # loaded again from disk
    assert be.loads.count("A") == 2 and cache.is_ready("A")
    assert cache.info("A").cold_loads == 2


def test_failed_load_reports_once_and_can_retry():
    be = FakeBackend()
    cache = DeltaCache(be, num_slots=2, max_host=2)
    cache.register("good", "ref-good")
    cache.register("bad", "bad-ref")
    failed = settle(cache, ["bad", "good"])
    assert [n for n, _ in failed] == ["bad"] and "cannot read bad-ref" in failed[0][1]
    assert cache.is_ready("good") and cache.failure("bad") and cache.info("bad").tier == "failed"
    assert settle(cache, ["bad"]) == []  # not retried on its own
    cache.retry("bad")
    assert [n for n, _ in settle(cache, ["bad"])] == ["bad"]


def test_byte_budget_limits_residents():
    be = FakeBackend()
    cache = DeltaCache(be, num_slots=4, max_host=4, max_gpu_bytes=250)
    for n, size in (("A", 100), ("B", 100), ("C", 100), ("H", 300)):
        cache.register(n, f"ref:{size}")
    settle(cache, ["A", "B", "C"])
    assert cache.is_ready("A") and cache.is_ready("B") and not cache.is_ready("C")
    failed = settle(cache, ["H"])
    assert [n for n, _ in failed] == ["H"] and "budget" in failed[0][1]


def test_loads_run_in_the_background():
    cache, be = make()
    be.gate.clear()
    cache.prefetch(["A"])
    assert cache.info("A").tier == "loading"
    assert cache.poll() == [] and not cache.is_ready("A")  # the engine keeps stepping meanwhile
    be.gate.set()
    settle(cache, ["A"])
    assert cache.is_ready("A")


def test_register_remove():
    cache, be = make()
    with pytest.raises(VariantLoadError):
        cache.register("A", "again")
    settle(cache, ["A"])
    cache.acquire("A")
    cache.remove("A")
    assert "A" not in cache and cache.slots[0] == "A"  # freed when its last sequence ends
    with pytest.raises(UnknownVariantError):
        cache.info("A")
    cache.release("A")
    assert cache.slots[0] is None and be.cleared == [0]
    cache.register("A", "ref-A2")  # the name can be reused
    assert cache.info("A").source == "ref-A2"

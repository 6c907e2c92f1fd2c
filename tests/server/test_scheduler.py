"""Scheduler and block manager bookkeeping (pure Python, no model)."""

from __future__ import annotations

import pytest
from deltahub.server.block_manager import BlockManager
from deltahub.server.config import EngineConfig
from deltahub.server.sampling import SamplingParams
from deltahub.server.scheduler import Scheduler
from deltahub.server.sequence import Sequence, SequenceStatus


class FakeSlots:
    """Resident variants; counts pins like the delta cache."""

    def __init__(self, resident=()):
        self.resident = set(resident)
        self.pins: dict = {}

    def is_ready(self, v):
        return v is None or v in self.resident

    def acquire(self, v):
        self.pins[v] = self.pins.get(v, 0) + 1

    def release(self, v):
        self.pins[v] -= 1
        assert self.pins[v] >= 0


def make(cfg=None, blocks=64, block_size=4, resident=()):
    cfg = cfg or EngineConfig(block_size=block_size)
    slots = FakeSlots(resident)
    return Scheduler(
        cfg, BlockManager(blocks, block_size), slots.is_ready, slots.acquire, slots.release
    ), slots


def seq(rid, n=5, variant=None, max_new=8):
    return Sequence(rid, list(range(1, n + 1)), SamplingParams(max_new_tokens=max_new), variant)


def step_decode(sched, batch):
    """Pretend the model ran: every scheduled sequence gets one token."""
    for s in batch.seqs:
        s.output_token_ids.append(7)


def test_block_manager_tables_and_slots():
    bm = BlockManager(8, 4)
    s = seq("a", n=6)
    assert bm.can_allocate(s)
    bm.allocate(s)
    assert len(s.block_table) == 2 and bm.num_free == 6
    assert bm.slot_mapping(s, 0, 6) == [s.block_table[p // 4] * 4 + p % 4 for p in range(6)]
    s.output_token_ids += [1, 1]  # 8 tokens: still 2 blocks
    assert not bm.needs_block(s)
    s.output_token_ids.append(1)  # the 9th token starts block 3
    assert bm.needs_block(s)
    bm.append_slot(s)
    assert len(s.block_table) == 3 and len(set(s.block_table)) == 3
    bm.free(s)
    assert bm.num_free == 8 and s.block_table == []
    big = seq("b", n=33)
    assert not bm.can_allocate(big)


def test_fcfs_admits_in_order_within_budgets():
    cfg = EngineConfig(block_size=4, max_num_batched_tokens=12, max_num_seqs=3)
    sched, _ = make(cfg)
    for i in range(5):
        sched.add(seq(f"r{i}", n=5))
    b = sched.schedule()
    assert [s.request_id for s in b.prefills] == ["r0", "r1"]  # 5 + 5 <= 12 < 15 tokens
    step_decode(sched, b)
    b = sched.schedule()
    assert [s.request_id for s in b.decodes] == ["r0", "r1"]
    assert [s.request_id for s in b.prefills] == ["r2"]  # max_num_seqs = 3
    assert b.num_tokens == 2 + 5


def test_skip_the_line_and_plain_fcfs():
    for skip, expect in ((True, ["b1", "b2"]), (False, [])):
        cfg = EngineConfig(block_size=4, skip_the_line=skip)
        sched, _ = make(cfg, resident={"B"})
        sched.add(seq("a1", variant="A"))
        sched.add(seq("b1", variant="B"))
        sched.add(seq("b2", variant="B"))
        b = sched.schedule()
        assert [s.request_id for s in b.prefills] == expect
        assert sched.waiting[0].request_id == "a1"
        assert sched.wanted_variants()[0] == "A"


def test_starvation_bound():
    cfg = EngineConfig(block_size=4, max_skips=3, max_num_seqs=64)
    sched, slots = make(cfg, blocks=256, resident={"B"})
    sched.add(seq("a", variant="A"))
    admitted_after_a = 0
    for i in range(10):  # a stream of requests for the resident variant keeps arriving
        sched.add(seq(f"b{i}", variant="B"))
        b = sched.schedule()
        admitted_after_a += len(b.prefills)
        step_decode(sched, b)
    a = next(s for s in sched.waiting if s.request_id == "a")
    assert a.skipped == cfg.max_skips == admitted_after_a
    assert len(sched.waiting) == 1 + 10 - 3  # everyone behind "a" now waits for it
    slots.resident.add("A")  # its variant arrives: it runs first, then the rest in order
    b = sched.schedule()
    assert b.prefills[0].request_id == "a"
    assert [s.request_id for s in b.prefills[1:]] == [f"b{i}" for i in range(3, 10)]


def test_admission_needs_blocks():
    cfg = EngineConfig(block_size=4, max_num_seqs=8)
    sched, _ = make(cfg, blocks=4, resident={"V"})
    s1, s2 = seq("s1", n=8, variant="V"), seq("s2", n=5, variant="V")
    sched.add(s1)
    sched.add(s2)
    b = sched.schedule()
    # s2's 2 blocks would leave none in reserve for s1's next decode
    assert b.prefills == [s1] and list(sched.waiting) == [s2]


def test_preemption_frees_the_youngest():
    cfg = EngineConfig(block_size=4, max_num_seqs=8)
    sched, slots = make(cfg, blocks=5, resident={"V"})
    s1, s2 = seq("s1", n=8, variant="V", max_new=50), seq("s2", n=4, variant="V", max_new=50)
    sched.add(s1)
    sched.add(s2)
    b = sched.schedule()
    assert b.prefills == [s1, s2]
    preempted = []
    for _ in range(8):  # both grow until the older one needs a block and none is left
        step_decode(sched, b)
        b = sched.schedule()
        preempted += b.preempted
        if preempted:
            break
    assert preempted == [s2] and list(sched.waiting) == [s2] and sched.running == [s1] and b.decodes == [s1]
    assert len(s1.block_table) == 4 == sched.blocks.num_used  # it got the block s2 gave back
    assert s2.status is SequenceStatus.WAITING and s2.block_table == [] and s2.num_preemptions == 1
    assert len(s2.output_token_ids) > 0  # kept: it resumes by recomputing prompt + outputs
    assert slots.pins["V"] == 1


def test_finish_releases_blocks_and_pins():
    sched, slots = make(resident={"V"})
    s = seq("x", variant="V")
    sched.add(s)
    sched.schedule()
    assert slots.pins["V"] == 1 and sched.blocks.num_used == 2
    sched.finish(s)
    assert slots.pins["V"] == 0 and sched.blocks.num_used == 0 and not sched.has_work()


@pytest.mark.parametrize("bad", [dict(block_size=0), dict(max_num_seqs=0), dict(max_skips=-1)])
def test_config_validation(bad):
    from deltahub.server.errors import EngineConfigError

    with pytest.raises(EngineConfigError):
        EngineConfig(**bad)

"""Paged KV cache bookkeeping (pure Python): fixed-size blocks, a free list, each sequence's
``block_table``; the runner turns a table into ``slot_mapping`` (block * block_size + offset)."""

from __future__ import annotations

from collections import deque

from deltahub.server.sequence import Sequence


class BlockManager:
    """``num_blocks`` blocks of ``block_size`` token slots each."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.free_block_ids: deque[int] = deque(range(num_blocks))
        self.used: set[int] = set()

    @property
    def num_free(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used(self) -> int:
        return len(self.used)

    def blocks_for(self, num_tokens: int) -> int:
        return (num_tokens + self.block_size - 1) // self.block_size

    def can_allocate(self, seq: Sequence, reserve: int = 0) -> bool:
        """Blocks for all of ``seq``'s tokens are free (keeping ``reserve`` blocks back)."""
        return self.blocks_for(len(seq)) - len(seq.block_table) + reserve <= self.num_free

    def _take(self) -> int:
        b = self.free_block_ids.popleft()
        self.used.add(b)
        return b

    def allocate(self, seq: Sequence) -> None:
        """Give ``seq`` blocks for all its tokens (prefill; none are cached yet)."""
        assert not seq.block_table, "sequence already holds blocks"
        need = self.blocks_for(len(seq))
        if need > self.num_free:
            raise RuntimeError("allocate() without can_allocate()")
        seq.block_table = [self._take() for _ in range(need)]
        seq.num_cached_tokens = 0

    def needs_block(self, seq: Sequence) -> bool:
        """Writing ``seq``'s newest token (position len-1) starts a new block."""
        return self.blocks_for(len(seq)) > len(seq.block_table)

    def can_append(self, seq: Sequence) -> bool:
        return not self.needs_block(seq) or self.num_free > 0

    def append_slot(self, seq: Sequence) -> None:
        """Make room for the newest token of a decoding sequence."""
        if self.needs_block(seq):
            if not self.free_block_ids:
                raise RuntimeError("append_slot() without can_append()")
            seq.block_table.append(self._take())

    def free(self, seq: Sequence) -> None:
        for b in reversed(seq.block_table):
            self.used.discard(b)
            self.free_block_ids.appendleft(b)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def slot_mapping(self, seq: Sequence, start: int, end: int) -> list[int]:
        """Cache slot of each position in [start, end) of ``seq``."""
        bs = self.block_size
        return [seq.block_table[p // bs] * bs + p % bs for p in range(start, end)]

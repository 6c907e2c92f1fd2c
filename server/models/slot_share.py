"""What the delta layers of one forward share.

Every layer of a step sees the same ``slot_idx`` [T], and a pool's ``map`` [S + 1] sends a slot to
itself where the pool holds that slot's delta and to -1 elsewhere. So pools that hold the same
live slots map the tokens alike: their gathered slot [T] and its ``Plan`` (a sort and a search,
about five small kernels on CUDA) are made once per set of live slots and reused by every such
layer of the step (7 per decoder layer in Llama), instead of once per layer. Layers that read
the same input one after the other (q / k / v, gate / up) share the copy of x that the slot-layout
SBMM reads (``kernels.permute_x``); the norms and the MLP's act(g) * u write that copy in the
launch that makes their output (``offer``), so only o_proj's input is permuted on its own. Given
the slots the batch's tokens use (``used``, known on the host when the step is scheduled), a layer
whose pool holds none of them skips its delta kernels, and the rest key on (and tune for) the
slots the batch can touch.

Pure bookkeeping on the host: a new share per forward (``BatchContext.share``); nothing here syncs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from deltahub.kernels import Plan


def _kernels():
    from deltahub import kernels

    return kernels


class SlotShare:
    """Per-forward memo of mapped slots, plans and the permuted input (see the module docstring).
    ``used``: the slots (< S) that tokens of the batch belong to, or None (unknown: all)."""

    def __init__(self, used: frozenset[int] | None = None) -> None:
        self.used = used
        self._slot_idx: torch.Tensor | None = None
        self._maps: dict[tuple[frozenset[int], int], tuple[torch.Tensor, Plan | None]] = {}
        self._perm: tuple[torch.Tensor, int, torch.Tensor] | None = None

    def touched(self, held: set[int] | frozenset[int]) -> frozenset[int]:
        """The slots of ``held`` (a pool's live slots) that the batch uses."""
        return frozenset(held) if self.used is None else self.used.intersection(held)

    def mapped(
        self, live: frozenset[int], map_: torch.Tensor, slot_idx: torch.Tensor
    ) -> tuple[torch.Tensor, Plan | None]:
        """(map_[slot_idx] int32 [T], its ``kernels.Plan`` over S = map_.numel() - 1 slots on CUDA,
        else None), made once per ``live``: the caller vouches that map_ sends the slots in ``live``
        to themselves and every other slot the batch uses to -1 (``touched``). A different
        ``slot_idx`` tensor (the logits of chosen rows, say) starts over."""
        if slot_idx is not self._slot_idx:
            self._slot_idx, self._maps = slot_idx, {}
        key = (live, map_.numel())
        hit = self._maps.get(key)
        if hit is None:
            slots = map_[slot_idx]
            hit = (slots, _kernels().plan(slots, map_.numel() - 1) if slots.is_cuda else None)
            self._maps[key] = hit
        return hit

    @staticmethod
    def wants_permuted(x: torch.Tensor) -> bool:
        """Whether x's producer should write ``permute_x(x)`` too: what the slot-layout SBMM reads
        (CUDA, 16-bit activations)."""
        return x.is_cuda and x.element_size() == 2

    def offer(self, x: torch.Tensor, k: int, xp: torch.Tensor) -> None:
        """Take ``xp`` = ``kernels.permute_x(x, k)``, made by x's producer, for the calls that read x."""
        self._perm = (x, k, xp)

    def permuted(self, x: torch.Tensor, k: int) -> torch.Tensor:
        """``kernels.permute_x(x, k)``, made once for consecutive calls on the same x tensor, which
        they must not change in place (only the last input is kept, so a forward holds no more
        activations than it would; inference tensors have no version counter to check)."""
        last = self._perm
        if last is not None and last[0] is x and last[1] == k:
            return last[2]
        xp = _kernels().permute_x(x, k)
        self._perm = (x, k, xp)
        return xp

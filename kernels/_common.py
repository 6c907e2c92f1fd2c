"""Shared by the grouped kernels: grouping tokens by slot on the device, and a small autotuner.

Grouping (``plan``): the tokens of a batch are sorted by slot (stable) and ``seg[s]`` is where slot
``s`` starts in that order, so slot s owns ``order[seg[s]:seg[s+1]]``. Two device ops, static
shapes, no host synchronisation: a plan can be made once per engine step and reused by every layer.
The kernels turn ``seg`` into their (slot, token block) work items themselves.
"""

from __future__ import annotations

import functools
import os
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

from deltahub.errors import ShapeMismatchError


class Plan(NamedTuple):
    """Tokens grouped by slot. Shape: order [T] int32 (token ids sorted by slot); seg [S + 1] int32."""

    order: torch.Tensor
    seg: torch.Tensor


def plan(slot: torch.Tensor, n_slots: int) -> Plan:
    """Group the tokens of ``slot`` [T] (int, -1 = none) by slot for ``n_slots`` stacked slots.

    Tokens whose slot is < 0 or >= n_slots belong to no segment (they are left untouched).
    """
    if slot.dim() != 1:
        raise ShapeMismatchError(f"slot must be 1-D, got shape {tuple(slot.shape)}")
    key = slot.to(torch.int32)
    sorted_slot, order = torch.sort(key, stable=True)
    bounds = torch.arange(n_slots + 1, dtype=torch.int32, device=slot.device)
    seg = torch.searchsorted(sorted_slot, bounds, out_int32=True)
    return Plan(order.to(torch.int32), seg)


def check_plan(p: Plan, t: int, n_slots: int) -> None:
    if p.order.shape != (t,) or p.seg.shape != (n_slots + 1,):
        raise ShapeMismatchError(
            f"plan was made for {tuple(p.order.shape)} tokens / {p.seg.numel() - 1} slots, "
            f"call has {t} tokens / {n_slots} slots"
        )


def forward_calls(module_name: str, op: str) -> None:
    """Make module ``deltahub.kernels.<op>`` callable as the package's op of the same name: once
    imported, the module is what ``deltahub.kernels.<op>`` names (Python binds submodules on their
    package), so ``kernels.sbmm(...)`` keeps working after ``import deltahub.kernels.sbmm``."""
    mod = sys.modules[module_name]
    package = module_name.rpartition(".")[0]

    class _OpModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return sys.modules[package]._OPS[op](*args, **kwargs)

    mod.__class__ = _OpModule


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_device(*tensors: torch.Tensor) -> None:
    dev = tensors[0].device
    for t in tensors:
        if t.device != dev:
            raise ShapeMismatchError(f"all tensors must be on one device, got {t.device} and {dev}")
    if dev.type != "cuda" and not interpreting():
        raise ShapeMismatchError("the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1)")


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.cache
def n_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (1 elsewhere: the interpreter's grids)."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def batch_class(t: int) -> int:
    """Autotuning bucket of a token count: the next power of two (1, 2, 4, ... 4096+)."""
    return min(next_pow2(max(t, 1)), 4096)


def graph_time_ms(fn: Callable[[], None], reps: int = 7) -> float:
    """Median time (ms) of one replay of a CUDA graph of ``fn`` (its launches back to back, as an
    engine's captured step runs them); the first call warms up outside the graph."""
    fn()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    g = torch.cuda.CUDAGraph()
    with torch.cuda.stream(stream), torch.cuda.graph(g, stream=stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    g.replay()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@dataclass
class Tuner:
    """Picks, per key, the fastest of some launch configs by timing them once (median of a few runs).

    ``run(config)`` must launch the op on scratch outputs. Under the interpreter, or with one
    candidate, the first candidate is taken untimed. ``graph``: time ``run`` as a CUDA graph
    replayed back to back (``graph_time_ms``) instead of ``triton.testing.do_bench`` (which clears
    the L2 before each launch). Times are kept in ``timings`` for reports.
    """

    best: dict = None  # type: ignore[assignment]
    timings: dict = None  # type: ignore[assignment]
    graph: bool = False

    def __post_init__(self) -> None:
        self.best, self.timings = {}, {}

    def pick(self, key: tuple, candidates: list, run: Callable[[object], None]):
        if key in self.best:
            return self.best[key]
        if len(candidates) == 1 or interpreting():
            self.best[key] = candidates[0]
            return candidates[0]
        from triton.testing import do_bench

        times = {}
        for c in candidates:
            try:
                if self.graph:
                    times[c] = graph_time_ms(lambda c=c: run(c))
                else:
                    times[c] = do_bench(lambda c=c: run(c), warmup=3, rep=12, return_mode="median")
            except Exception as exc:  # a config the compiler rejects (resources) is skipped
                if "out of resource" not in str(exc).lower() and "OutOfResources" not in type(exc).__name__:
                    raise
        self.timings[key] = times
        self.best[key] = min(times, key=times.get)
        return self.best[key]

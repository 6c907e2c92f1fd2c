"""Random packed deltas (built through deltahub.format) and token->slot spreads for kernel tests."""

from __future__ import annotations

import torch

from deltahub.format import QuantLayout, mask_to_indices, pack_qlinear

SPREADS = ("distinct", "same", "uniform", "zipf", "hot_base", "unsorted")


def make_stack(s: int, n: int, k: int, layout: QuantLayout, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """S random qlinear deltas of shape [n, k] stacked: {"qweight", "scales"[, "meta", "qweight_hi"]}."""
    packs = []
    for _ in range(s):
        kv = layout.n_values(k)
        codes = torch.randint(0, 2**layout.bits, (n, kv), generator=gen, dtype=torch.int64).to(torch.uint8)
        scales = torch.rand(n, layout.n_groups(k), generator=gen) * 0.02 + 0.005
        idx = None
        if layout.sparse:
            kp = layout.padded_k(k)
            keep = torch.rand(n, kp // 4, 4, generator=gen).argsort(-1)[..., :2]
            mask = torch.zeros(n, kp // 4, 4, dtype=torch.bool).scatter_(-1, keep, True)
            idx = mask_to_indices(mask.reshape(n, kp))
        packs.append(pack_qlinear(codes, scales, layout, (n, k), idx))
    return {name: torch.stack([p.parts[name] for p in packs]) for name in packs[0].parts}


def make_slots(spread: str, t: int, s: int, gen: torch.Generator) -> torch.Tensor:
    """slot [T] int32 for T tokens over S slots, spread as named (see SPREADS)."""
    if spread == "distinct":  # every token its own slot (as far as slots go), in order
        slot = torch.arange(t) % s
    elif spread == "same":
        slot = torch.full((t,), s - 1)
    elif spread == "uniform":
        slot = torch.randint(0, s, (t,), generator=gen)
    elif spread == "zipf":
        p = 1.0 / torch.arange(1, s + 1, dtype=torch.float64)
        slot = torch.multinomial(p / p.sum(), t, replacement=True, generator=gen)
    elif spread == "hot_base":  # one hot variant, the rest base-only tokens
        slot = torch.where(torch.rand(t, generator=gen) < 0.6, torch.tensor(1 % s), torch.tensor(-1))
    elif spread == "unsorted":  # all slots and base-only, shuffled
        slot = (torch.arange(t) % (s + 1)) - 1
        slot = slot[torch.randperm(t, generator=gen)]
    else:
        raise ValueError(spread)
    return slot.to(torch.int32)


def used_slots(slot: torch.Tensor) -> int | None:
    """How many distinct slots the tokens use (``sbmm_device``'s ``active``, as the engine knows
    it); None when every token is base-only."""
    return len(set(slot[slot >= 0].tolist())) or None


def poisoned(t: int, n: int, slot: torch.Tensor, dtype: torch.dtype, gen: torch.Generator,
             device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(init, out) [t, n]: random outputs with NaN in the rows of base-only tokens (they must stay
    untouched; the others must get exactly += the delta), and a copy for the kernel to write."""
    init = (torch.randn(t, n, generator=gen) * 0.1).to(dtype).to(device)
    init[slot < 0] = float("nan")
    return init, init.clone()


def assert_added(init: torch.Tensor, out: torch.Tensor, y: torch.Tensor, slot: torch.Tensor, tol: float,
                 what: str = "") -> None:
    """out = init + y on the delta tokens (max error within ``tol`` x max |init + y|), base-only rows
    untouched (still NaN), every delta row written."""
    if out.is_cuda:
        torch.cuda.synchronize()
    base = slot < 0
    assert bool(out[base].isnan().all()), "base-only row written"
    want, got = init[~base].float() + y[~base], out[~base].float()
    assert got.numel() > 0 and not got.isnan().any(), "a row with a slot was not written"
    err = float((got - want).abs().max() / want.abs().max().clamp_min(1e-6))
    assert err <= tol, f"{what} max rel err {err:.2e}"

"""SlotShare: the layers of one forward share the mapped slots, their plan and the permuted input;
a DeltaLinear with a share adds exactly what it adds without one (CPU; the GPU path, where the
plans and the permuted x are used, is in tests/kernels/test_gpu.py)."""

from __future__ import annotations

import torch
from deltahub.kernels.sbmm24 import permute_x_torch
from deltahub.server.models.delta_linear import DeltaLinear
from deltahub.server.models.slot_share import SlotShare

from deltahub.format import PackedTensor, QuantLayout

from ..kernels.kernel_cases import make_stack

S, N, K = 4, 24, 128


def _qlinear(st: dict, i: int, lay: QuantLayout) -> PackedTensor:
    return PackedTensor("qlinear", (N, K), {name: v[i] for name, v in st.items()}, layout=lay)


def _lora(gen: torch.Generator, r: int = 4) -> PackedTensor:
    a, b = torch.randn(r, K, generator=gen), torch.randn(N, r, generator=gen)
    parts = {"lora_A": a * 0.1, "lora_B": b * 0.1}
    return PackedTensor("lowrank", (N, K), parts)


def _layer(writes: dict[int, PackedTensor]) -> DeltaLinear:
    lin = DeltaLinear(K, N, False, S, torch.float32, torch.device("cpu"))
    lin.weight.data.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    for slot, p in writes.items():
        lin.prepare({"weight": p}, "w")
        lin.write_slot(slot, {"weight": p})
    return lin


def _held_matches_maps(lin: DeltaLinear) -> None:
    pools = lin.pools()["weight"]
    maps = {("q", key): pool["map"] for key, pool in pools.q.items()}
    if pools.lora is not None:
        maps["lora"] = pools.lora["map"]
    for name, map_ in maps.items():
        want = {s for s in range(S) if int(map_[s]) == s}
        assert pools.held.get(name, set()) == want, name
        assert all(int(map_[s]) == -1 for s in range(S + 1) if s not in want)


def test_mapped_is_made_once_per_live_set_and_per_slot_index():
    share = SlotShare()
    slot_idx = torch.tensor([0, 4, 2, 1, 2])
    a = torch.tensor([0, -1, 2, -1, -1], dtype=torch.int32)
    b = torch.tensor([0, 1, -1, -1, -1], dtype=torch.int32)
    got_a, plan_a = share.mapped(frozenset({0, 2}), a, slot_idx)
    assert plan_a is None  # plans are for the CUDA kernels only
    assert torch.equal(got_a, a[slot_idx])
    assert share.mapped(frozenset({0, 2}), a.clone(), slot_idx)[0] is got_a  # same live set: reused
    got_b = share.mapped(frozenset({0, 1}), b, slot_idx)[0]
    assert torch.equal(got_b, b[slot_idx]) and got_b is not got_a
    other = slot_idx.clone()  # another batch (same values, another tensor): made anew
    assert share.mapped(frozenset({0, 2}), a, other)[0] is not got_a


def test_permuted_is_shared_by_consecutive_calls_on_one_input():
    share = SlotShare()
    x, y = torch.randn(3, K).bfloat16(), torch.randn(3, K).bfloat16()
    px = share.permuted(x, K)
    assert torch.equal(px, permute_x_torch(x, K))
    assert share.permuted(x, K) is px
    assert torch.equal(share.permuted(y, K), permute_x_torch(y, K))
    assert share.permuted(x, K) is not px  # only the last input is kept


def test_layers_with_a_share_add_what_they_add_alone():
    """Three layers of one step, live slots {0, 2} (4-bit), {0, 2} (4-bit, after slot 2 moved from
    the 2-bit pool) and {1} (2-bit) plus a LoRA on slot 3, each applied to one input with and
    without a share; the held slots follow the maps through writes and clears."""
    gen = torch.Generator().manual_seed(5)
    lay4, lay2 = QuantLayout(4, "2:4"), QuantLayout(2, "2:4", 64)
    st4, st2 = make_stack(3, N, K, lay4, gen), make_stack(2, N, K, lay2, gen)
    layers = [
        _layer({0: _qlinear(st4, 0, lay4), 2: _qlinear(st4, 1, lay4)}),
        _layer({0: _qlinear(st4, 2, lay4), 2: _qlinear(st2, 0, lay2)}),
        _layer({1: _qlinear(st2, 1, lay2), 3: _lora(gen)}),
    ]
    layers[1].write_slot(2, {"weight": _qlinear(st4, 0, lay4)})  # slot 2 moves to the 4-bit pool
    layers[2].clear_slot(1)
    layers[2].write_slot(1, {"weight": _qlinear(st2, 0, lay2)})
    for lin in layers:
        _held_matches_maps(lin)
    x = torch.randn(7, K, generator=gen)
    slot_idx = torch.tensor([0, 4, 2, 3, 1, 2, 0])  # 4 = S: base only
    share = SlotShare()
    for lin in layers:
        torch.testing.assert_close(lin(x, slot_idx, share), lin(x, slot_idx), rtol=0, atol=0)
    # {0, 2} was made once for layers 0 and 1; layer 1's 2-bit pool is empty now: skipped
    assert {live for live, _ in share._maps} == {frozenset({0, 2}), frozenset({1}), frozenset({3})}
    # the batch's slots known on the host: pools that hold none of them are skipped, the rest key on
    # the slots the batch can touch (layers 0 and 1 hold {0, 2}, the batch uses {0})
    only0 = torch.tensor([0, 4, 0, 4])
    share = SlotShare(used=frozenset({0}))
    for lin in layers:
        torch.testing.assert_close(lin(x[:4], only0, share), lin(x[:4], only0), rtol=0, atol=0)
    assert {live for live, _ in share._maps} == {frozenset({0})}
    torch.testing.assert_close(layers[2](x[:4], only0, share), x[:4] @ layers[2].weight.T)

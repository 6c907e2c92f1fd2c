"""paged_decode_attention (kernels/attention.py) under the interpreter against the float32 torch
reference: GQA groups, head sizes that are not powers of two, cache blocks smaller and larger than
the kernel's tile, shuffled physical blocks, contexts of one token and of partial blocks, a
sliding window, both 16-bit dtypes; and its shape errors."""

from __future__ import annotations

import pytest
import torch
from deltahub.kernels import reference
from deltahub.kernels.attention import paged_decode_attention

from deltahub.errors import ShapeMismatchError

TOL = {torch.bfloat16: 2e-2, torch.float16: 4e-3}  # the probabilities meet V in the 16-bit dtype


def _case(nd, h, hkv, dh, bs, lens, dtype, seed):
    """q [nd, h, dh], caches of shuffled blocks, each sequence's block table (padded with block 0)."""
    gen = torch.Generator().manual_seed(seed)
    per = [-(-n // bs) for n in lens]
    width, n_blocks = max(per), sum(per) + 3  # 3 blocks nobody owns
    ids = torch.randperm(n_blocks, generator=gen).tolist()
    tables = []
    for p in per:
        tables.append(ids[:p] + [0] * (width - p))
        ids = ids[p:]
    q = torch.randn(nd, h, dh, generator=gen).to(dtype)
    k_cache = torch.randn(n_blocks, bs, hkv, dh, generator=gen).to(dtype)
    v_cache = torch.randn(n_blocks, bs, hkv, dh, generator=gen).to(dtype)
    return q, k_cache, v_cache, torch.tensor(tables, dtype=torch.int32), torch.tensor(lens)


@pytest.mark.parametrize(
    ("nd", "h", "hkv", "dh", "bs", "lens", "window"),
    [
        (3, 4, 4, 64, 16, [1, 17, 40], None),  # no GQA; one token; partial blocks
        (2, 8, 2, 48, 8, [100, 9], None),  # GQA 4, Dh not a power of two, 8 blocks per tile
        (4, 6, 2, 32, 128, [130, 5, 64, 257], None),  # blocks larger than a tile
        (2, 9, 3, 64, 16, [90, 33], 20),  # sliding window
        (1, 2, 1, 16, 4, [3], 8),  # a window longer than the context
    ],
)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_paged_decode_attention_matches_reference(nd, h, hkv, dh, bs, lens, window, dtype):
    """One program per (sequence, kv head), and the context shared out over 3 programs (some of
    which get no tile when a context is short) whose parts a second launch adds up."""
    q, kc, vc, bt, cl = _case(nd, h, hkv, dh, bs, lens, dtype, seed=nd * 31 + dh + bs)
    scale = dh**-0.5
    want = reference.paged_decode_attention(q, kc, vc, bt, cl, scale, window)
    for splits in (1, 3):
        got = paged_decode_attention(q, kc, vc, bt, cl, scale, window, splits=splits)
        assert got.shape == q.shape and got.dtype == dtype
        err = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert err <= TOL[dtype], (splits, err)


def test_paged_decode_attention_reads_only_its_own_blocks():
    """A sequence's output depends on its own blocks only: rewriting every other block (and the
    positions past its context in its last block) leaves it unchanged."""
    q, kc, vc, bt, cl = _case(2, 4, 2, 32, 8, [13, 20], torch.bfloat16, seed=5)
    first = paged_decode_attention(q, kc, vc, bt, cl, 0.2)
    mine = set(bt[0, : -(-13 // 8)].tolist())
    kc2, vc2 = kc.clone(), vc.clone()
    for b in range(kc.shape[0]):
        if b not in mine:
            kc2[b], vc2[b] = 100.0, -100.0
    last = bt[0, 1].item()
    kc2[last, 13 - 8 :], vc2[last, 13 - 8 :] = 100.0, -100.0
    again = paged_decode_attention(q, kc2, vc2, bt, cl, 0.2)
    assert torch.equal(again[0], first[0])
    assert not torch.equal(again[1], first[1])


def test_paged_decode_attention_errors():
    q, kc, vc, bt, cl = _case(2, 4, 2, 32, 8, [5, 6], torch.bfloat16, seed=1)
    with pytest.raises(ShapeMismatchError, match="fp16/bf16"):
        paged_decode_attention(q.float(), kc, vc, bt, cl, 1.0)
    with pytest.raises(ShapeMismatchError, match="kv heads"):
        paged_decode_attention(q[:, :3], kc, vc, bt, cl, 1.0)
    with pytest.raises(ShapeMismatchError, match="caches"):
        paged_decode_attention(q, kc, vc[..., :16], bt, cl, 1.0)
    with pytest.raises(ShapeMismatchError, match="block_tables"):
        paged_decode_attention(q, kc, vc, bt[:1], cl, 1.0)
    with pytest.raises(ShapeMismatchError, match="window"):
        paged_decode_attention(q, kc, vc, bt, cl, 1.0, 0)

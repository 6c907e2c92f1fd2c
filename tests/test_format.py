"""Property tests of the delta layout (deltahub.format): bit packing, 2:4 indices, qlinear."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahub import format as fmt
from deltahub.errors import CodecError

FAST = settings(max_examples=40, deadline=None)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@FAST
@given(width=st.sampled_from([1, 2, 4, 8]), rows=st.integers(1, 5), words=st.integers(1, 6),
       seed=st.integers(0, 2**31 - 1))
def test_pack_bits_roundtrip_and_layout(width, rows, words, seed):
    per = 32 // width
    fields = torch.randint(0, 2**width, (rows, words * per), generator=_gen(seed), dtype=torch.int64)
    packed = fmt.pack_bits(fields, width)
    assert packed.dtype == torch.int32 and packed.shape == (rows, words)
    assert torch.equal(fmt.unpack_bits(packed, width).to(torch.int64), fields)
    # field j of a word sits in bits [j*w, (j+1)*w), read the way the kernels read it
    j = int(torch.randint(0, per, (1,), generator=_gen(seed + 1)))
    word = int(packed[0, 0]) & 0xFFFFFFFF
    assert (word >> (width * j)) & (2**width - 1) == int(fields[0, j])


@FAST
@given(bits=st.sampled_from(fmt.SUPPORTED_BITS), rows=st.integers(1, 4), groups=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_pack_codes_every_bit_width(bits, rows, groups, seed):
    codes = torch.randint(0, 2**bits, (rows, 32 * groups), generator=_gen(seed)).to(torch.uint8)
    parts = fmt.pack_codes(codes, bits)
    assert set(parts) == ({"qweight", "qweight_hi"} if bits == 3 else {"qweight"})
    assert torch.equal(fmt.unpack_codes(parts, bits), codes)
    words = 32 * groups * (2 if bits == 3 else bits) // 32
    assert parts["qweight"].shape == (rows, words)


def test_pack_bits_rejects_out_of_range():
    with pytest.raises(CodecError):
        fmt.pack_bits(torch.tensor([[4] + [0] * 15]), 2)


def _random_24_mask(n: int, kp: int, seed: int) -> torch.Tensor:
    scores = torch.rand(n, kp // 4, 4, generator=_gen(seed))
    top = scores.topk(2, dim=-1).indices
    return torch.zeros(n, kp // 4, 4, dtype=torch.bool).scatter_(-1, top, True).reshape(n, kp)


@FAST
@given(n=st.integers(1, 6), blocks=st.integers(1, 3), seed=st.integers(0, 2**31 - 1))
def test_24_indices_encode_exactly(n, blocks, seed):
    kp = 64 * blocks
    mask = _random_24_mask(n, kp, seed)
    idx = fmt.mask_to_indices(mask)
    assert idx.shape == (n, kp // 2) and int(idx.max()) <= 3
    pairs = idx.reshape(n, -1, 2)
    assert bool((pairs[..., 0] < pairs[..., 1]).all())  # increasing within each group
    dense_k = fmt.indices_to_dense_k(idx)
    back = torch.zeros(n, kp, dtype=torch.bool).scatter_(1, dense_k, True)
    assert torch.equal(back, mask)
    meta = fmt.pack_bits(idx, 2)  # 16 positions per int32, as stored
    assert meta.shape == (n, kp // 32)
    assert torch.equal(fmt.unpack_bits(meta, 2), idx)


def test_mask_must_keep_exactly_two_of_four():
    mask = torch.zeros(1, 64, dtype=torch.bool)
    mask[0, :3] = True
    with pytest.raises(CodecError):
        fmt.mask_to_indices(mask)


@FAST
@given(bits=st.sampled_from([2, 3, 4, 8]), sparse=st.booleans(), group=st.sampled_from([None, 32, 64]),
       n=st.integers(1, 5), k=st.integers(1, 200), seed=st.integers(0, 2**31 - 1))
def test_qlinear_dequantizes_to_the_grid_values(bits, sparse, group, n, k, seed):
    """pack_qlinear + dequantize reproduce scale * (code - z) at exactly the kept positions."""
    layout = fmt.QuantLayout(bits, "2:4" if sparse else "none", group)
    g = _gen(seed)
    kp, kv = layout.padded_k(k), layout.n_values(k)
    scales = torch.rand(n, layout.n_groups(k), generator=g) + 0.1
    codes = torch.randint(0, 2**bits, (n, kv), generator=g).to(torch.uint8)
    if sparse:
        mask = _random_24_mask(n, kp, seed)
        idx = fmt.mask_to_indices(mask)
        dense_k = fmt.indices_to_dense_k(idx)
    else:
        idx, dense_k = None, torch.arange(kp).expand(n, kp)
    packed = fmt.pack_qlinear(codes, scales, layout, (n, k), idx)
    for name, shape in layout.part_shapes(n, k).items():
        assert tuple(packed.parts[name].shape) == shape
    expect = torch.zeros(n, kp)
    gi = (dense_k // (group or kp)).clamp(max=scales.shape[1] - 1)
    vals = torch.gather(scales, 1, gi) * (codes.float() - (2**bits - 1) / 2)
    expect.scatter_(1, dense_k, vals)
    assert torch.equal(fmt.dequantize(packed), expect[:, :k])


@FAST
@given(bits=st.sampled_from([2, 3, 4, 8]), seed=st.integers(0, 2**31 - 1))
def test_quantize_codes_is_exact_on_grid_points(bits, seed):
    scales = torch.rand(4, 1, generator=_gen(seed)) + 0.5
    codes = torch.randint(0, 2**bits, (4, 64), generator=_gen(seed + 1)).to(torch.uint8)
    values = fmt.dequantize_codes(codes, scales, bits)
    assert torch.equal(fmt.quantize_codes(values, scales, bits), codes)


def test_apply_delta_appends_extra_rows():
    layout = fmt.QuantLayout(8, "none")
    codes = torch.full((3, 64), 128, dtype=torch.uint8)  # +0.5 level
    packed = fmt.pack_qlinear(codes, torch.full((3, 1), 2.0), layout, (3, 64))
    packed.parts["extra_rows"] = torch.ones(2, 64)
    out = fmt.apply_delta(torch.zeros(3, 64), packed)
    assert out.shape == (5, 64)
    assert torch.equal(out[:3], torch.ones(3, 64)) and torch.equal(out[3:], torch.ones(2, 64))

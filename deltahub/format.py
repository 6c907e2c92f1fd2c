"""The delta format: how one compressed tensor is laid out. The single contract between the
compressor (deltahub.codecs), the reader/writer (deltahub.store) and the kernels (deltahub.kernels).

A weight delta Δ of shape [N, K] (torch's Linear layout: N outputs, K inputs) is stored as one of:

``qlinear`` -- quantized, optionally 2:4 sparse. Parts:
    qweight     int32 [N, Kv * b' / 32]  codes, packed along K (b' = 2 for 3-bit, else b)
    qweight_hi  int32 [N, Kv / 32]       3-bit only: the high bit of each code
    meta        int32 [N, Kv / 16]       2:4 only: position (0..3) of each kept value in its group
    scales      float32 [N, n_groups]    one scale per output row and group of ``group_size`` inputs
    extra_rows  [A, K]                   optional: rows the fine-tune added (values, not deltas)
  K is zero-padded to Kp = ceil(K / 64) * 64. Kv = Kp / 2 for 2:4 (kept values), Kp otherwise.
  2:4: inputs are cut in groups of 4; each keeps 2 values, stored in order (value 2g, 2g+1 for
  group g, positions strictly increasing). Code c of bits b dequantizes to
  ``scales[n, k // group_size] * (c - (2**b - 1) / 2)`` -- a symmetric mid-rise grid with no zero
  level (pruned entries are the zeros), where k is the value's dense input index.
  Packing: value j of a word sits in bits [j*w, (j+1)*w) of the int32 (w = bits per field), words
  run along K, so the kernels unpack with ``(word >> (w * j)) & (2**w - 1)``.
  bits 1 with one scale per matrix is BitDelta (sign x scale).

``dense`` -- parts: ``delta`` [N, K] (or any shape) in bf16/fp16/fp32.

``lowrank`` -- parts: ``lora_A`` [r, K], ``lora_B`` [N, r]: Δ ≈ lora_B @ lora_A (served by SGMV).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from deltahub.errors import CodecError

FORMAT_VERSION = 1
K_ALIGN = 64
SUPPORTED_BITS = (1, 2, 3, 4, 8)
SPARSITIES = ("2:4", "none")
KINDS = ("qlinear", "dense", "lowrank")


@dataclass(frozen=True)
class QuantLayout:
    """How a ``qlinear`` tensor is quantized: bits, sparsity and the input-group size of scales.

    ``group_size=None`` means one scale per output row.
    """

    bits: int
    sparsity: str = "2:4"
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise CodecError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.sparsity not in SPARSITIES:
            raise CodecError(f"sparsity must be one of {SPARSITIES}, got {self.sparsity!r}")
        if self.group_size is not None:
            g = self.group_size
            if g < 32 or g & (g - 1):
                raise CodecError(f"group size must be a power of two >= 32, got {g}")

    @property
    def sparse(self) -> bool:
        return self.sparsity == "2:4"

    @property
    def zero_point(self) -> float:
        """Code value that maps to 0.0 (between two levels: the grid is mid-rise)."""
        return (2**self.bits - 1) / 2

    @property
    def max_level(self) -> float:
        """Largest |code - zero_point|: a value of ``scale * max_level`` is exactly representable."""
        return (2**self.bits - 1) / 2

    def padded_k(self, k: int) -> int:
        return math.ceil(k / K_ALIGN) * K_ALIGN

    def n_values(self, k: int) -> int:
        """Stored values per row (Kv)."""
        kp = self.padded_k(k)
        return kp // 2 if self.sparse else kp

    def n_groups(self, k: int) -> int:
        return 1 if self.group_size is None else math.ceil(k / self.group_size)

    def part_shapes(self, n: int, k: int) -> dict[str, tuple[int, int]]:
        """Shapes of the int32/float32 parts of an [n, k] tensor (extra_rows excluded)."""
        kv = self.n_values(k)
        shapes: dict[str, tuple[int, int]] = {}
        if self.bits == 3:
            shapes["qweight"] = (n, kv * 2 // 32)
            shapes["qweight_hi"] = (n, kv // 32)
        else:
            shapes["qweight"] = (n, kv * self.bits // 32)
        if self.sparse:
            shapes["meta"] = (n, kv // 16)
        shapes["scales"] = (n, self.n_groups(k))
        return shapes

    def to_dict(self) -> dict:
        return {"bits": self.bits, "sparsity": self.sparsity, "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> QuantLayout:
        return cls(bits=int(d["bits"]), sparsity=d.get("sparsity", "none"), group_size=d.get("group_size"))


@dataclass
class PackedTensor:
    """One compressed delta: ``kind`` in KINDS, logical ``shape`` of Δ, and its stored ``parts``.

    ``codec`` names the method that made it (informational); ``layout`` is set for ``qlinear``.
    """

    kind: str
    shape: tuple[int, ...]
    parts: dict[str, torch.Tensor]
    codec: str = ""
    layout: QuantLayout | None = None
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        if self.kind not in KINDS:
            raise CodecError(f"unknown tensor kind {self.kind!r}")
        if self.kind == "qlinear":
            if self.layout is None or len(self.shape) != 2:
                raise CodecError("a qlinear tensor needs a layout and a 2-D shape")
            expected = self.layout.part_shapes(*self.shape)
            for name, shp in expected.items():
                got = self.parts.get(name)
                if got is None or tuple(got.shape) != shp:
                    raise CodecError(
                        f"qlinear part {name!r}: expected shape {shp}, got "
                        f"{None if got is None else tuple(got.shape)}"
                    )

    @property
    def nbytes(self) -> int:
        """Bytes of all parts as stored before the lossless stage."""
        return sum(t.numel() * t.element_size() for t in self.parts.values())


# ----------------------------------------------------------------------------------------------
# Bit packing


def _to_int32(v: torch.Tensor) -> torch.Tensor:
    """Wrap an int64 tensor holding unsigned 32-bit words into int32 two's complement."""
    return torch.where(v >= 2**31, v - 2**32, v).to(torch.int32)


def pack_bits(fields: torch.Tensor, width: int) -> torch.Tensor:
    """Pack unsigned ``width``-bit fields along the last dim into int32 words.

    Shape: fields [..., M] (M a multiple of 32 // width) -> [..., M * width // 32] int32.
    Field j of a word occupies bits [j*width, (j+1)*width).
    """
    per = 32 // width
    if fields.shape[-1] % per:
        raise CodecError(f"cannot pack {fields.shape[-1]} fields of {width} bits into whole words")
    f = fields.to(torch.int64).reshape(*fields.shape[:-1], -1, per)
    if f.numel() and (int(f.min()) < 0 or int(f.max()) >= 2**width):
        raise CodecError(f"field value out of range for {width} bits")
    shifts = torch.arange(per, dtype=torch.int64, device=f.device) * width
    return _to_int32((f << shifts).sum(-1))


def unpack_bits(words: torch.Tensor, width: int) -> torch.Tensor:
    """Inverse of pack_bits. Shape: [..., W] int32 -> [..., W * 32 // width] uint8."""
    per = 32 // width
    shifts = torch.arange(per, dtype=torch.int32, device=words.device) * width
    f = (words.unsqueeze(-1) >> shifts) & (2**width - 1)
    return f.reshape(*words.shape[:-1], -1).to(torch.uint8)


def pack_codes(codes: torch.Tensor, bits: int) -> dict[str, torch.Tensor]:
    """Codes [N, Kv] (uint8, < 2**bits) -> {"qweight"[, "qweight_hi"]} int32 parts."""
    if bits == 3:
        c = codes.to(torch.int64)
        return {"qweight": pack_bits(c & 3, 2), "qweight_hi": pack_bits(c >> 2, 1)}
    return {"qweight": pack_bits(codes, bits)}


def unpack_codes(parts: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Inverse of pack_codes: -> codes [N, Kv] uint8."""
    if bits == 3:
        return unpack_bits(parts["qweight"], 2) | (unpack_bits(parts["qweight_hi"], 1) << 2)
    return unpack_bits(parts["qweight"], bits)


# ----------------------------------------------------------------------------------------------
# 2:4 structure


def mask_to_indices(mask: torch.Tensor) -> torch.Tensor:
    """A 2:4 mask [N, Kp] (exactly 2 True per group of 4) -> positions [N, Kp/2] uint8 (0..3),
    increasing within each group."""
    n, kp = mask.shape
    g = mask.reshape(n, kp // 4, 4)
    if not bool((g.sum(-1) == 2).all()):
        raise CodecError("2:4 mask must keep exactly 2 entries in every group of 4")
    pos = torch.arange(4, device=mask.device).expand_as(g)
    # stable: kept positions first, in increasing order
    order = torch.argsort((~g).to(torch.int8) * 4 + pos, dim=-1)[..., :2]
    return order.reshape(n, kp // 2).to(torch.uint8)


def indices_to_dense_k(idx: torch.Tensor) -> torch.Tensor:
    """Positions [N, Kv] (0..3) -> dense input index [N, Kv] of every kept value (int64)."""
    kv = idx.shape[-1]
    group = torch.arange(kv, device=idx.device) // 2
    return group * 4 + idx.to(torch.int64)


def value_dense_k(layout: QuantLayout, parts: dict[str, torch.Tensor], n: int, k: int) -> torch.Tensor:
    """Dense input index [N, Kv] of every stored value."""
    kv = layout.n_values(k)
    if layout.sparse:
        return indices_to_dense_k(unpack_bits(parts["meta"], 2))
    return torch.arange(kv, device=parts["qweight"].device).expand(n, kv)


# ----------------------------------------------------------------------------------------------
# Quantized linear: build and dequantize


def quantize_codes(values: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``values / scales`` onto the mid-rise grid of ``bits``. Same shapes; -> uint8 codes.

    Zero scales give code 0 (their value is 0 whatever the code).
    """
    z = (2**bits - 1) / 2
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    q = torch.floor(values / safe + z + 0.5)
    return q.clamp_(0, 2**bits - 1).to(torch.uint8)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """codes (uint8) and broadcastable scales -> float32 values ``scales * (codes - z)``."""
    return scales.to(torch.float32) * (codes.to(torch.float32) - (2**bits - 1) / 2)


def value_scales(layout: QuantLayout, scales: torch.Tensor, dense_k: torch.Tensor) -> torch.Tensor:
    """Scale [N, Kv] of every stored value, from scales [N, G] and dense indices [N, Kv]."""
    if layout.group_size is None:
        return scales[:, :1].expand_as(dense_k)
    g = (dense_k // layout.group_size).clamp_(max=scales.shape[1] - 1)
    return torch.gather(scales, 1, g)


def pack_qlinear(
    codes: torch.Tensor,
    scales: torch.Tensor,
    layout: QuantLayout,
    shape: tuple[int, int],
    indices: torch.Tensor | None = None,
    *,
    codec: str = "",
) -> PackedTensor:
    """Assemble a qlinear PackedTensor.

    Shape: codes [N, Kv] uint8; scales [N, n_groups] float; indices [N, Kv] uint8 (2:4 only).
    """
    n, k = shape
    parts = pack_codes(codes, layout.bits)
    if layout.sparse:
        if indices is None:
            raise CodecError("2:4 tensors need their indices")
        parts["meta"] = pack_bits(indices, 2)
    parts["scales"] = scales.to(torch.float32).contiguous()
    return PackedTensor("qlinear", (n, k), parts, codec=codec, layout=layout)


def dequantize(packed: PackedTensor) -> torch.Tensor:
    """Δ of a packed tensor as float32 [N, K] (extra_rows excluded)."""
    if packed.kind == "dense":
        return packed.parts["delta"].to(torch.float32)
    if packed.kind == "lowrank":
        a = packed.parts["lora_A"].to(torch.float32)
        b = packed.parts["lora_B"].to(torch.float32)
        return b @ a
    layout = packed.layout
    assert layout is not None
    n, k = packed.shape
    codes = unpack_codes(packed.parts, layout.bits)
    dense_k = value_dense_k(layout, packed.parts, n, k)
    vals = dequantize_codes(codes, value_scales(layout, packed.parts["scales"], dense_k), layout.bits)
    if not layout.sparse:
        return vals[:, :k].contiguous()
    out = torch.zeros(n, layout.padded_k(k), dtype=torch.float32, device=vals.device)
    out.scatter_(1, dense_k, vals)
    return out[:, :k].contiguous()


def apply_delta(base: torch.Tensor, packed: PackedTensor) -> torch.Tensor:
    """Fine-tune tensor = base + Δ (computed in float32, returned in base's dtype), with the
    fine-tune's added rows (``extra_rows``) appended."""
    if tuple(base.shape) != packed.shape:
        from deltahub.errors import ShapeMismatchError

        raise ShapeMismatchError(f"base tensor has shape {tuple(base.shape)}, delta expects {packed.shape}")
    out = (base.to(torch.float32) + dequantize(packed).reshape(base.shape)).to(base.dtype)
    extra = packed.parts.get("extra_rows")
    if extra is not None:
        out = torch.cat([out, extra.to(base.dtype)], dim=0)
    return out

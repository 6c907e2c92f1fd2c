"""The codec interface and the quantization helpers codecs share.

A codec turns the weight delta of one matrix into a :class:`~deltahub.format.PackedTensor`:

    codec = get_codec("obs")(CodecSettings(bits=4, sparsity="2:4"))
    packed = codec.compress(delta, hessian)      # delta [N, K]; hessian [K, K] or None
    approx = codec.decompress(packed)            # float32 [N, K]
    size = codec.nbytes(packed)                  # bytes before the lossless stage

``hessian`` is the layer-input second moment ``H = 2 X Xᵀ / n`` (X [K, n] calibration inputs of
the linear layer), given to codecs whose ``needs_calibration`` is True. Every codec must also
accept ``hessian=None`` (no calibration available, e.g. embeddings) and then minimise plain
weight error. Codecs never see padding: they receive the true [N, K] delta and must return a
PackedTensor whose ``shape`` is (N, K); qlinear tensors go through ``format.pack_qlinear``.

A new method subclasses :class:`Codec`, sets ``name`` (and ``needs_calibration``), reads what it
needs from ``CodecSettings`` (``bits``/``sparsity``/``group_size`` and method-specific
``options``), implements ``compress``, and adds one line to ``deltahub.codecs.CODECS``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from deltahub import format as fmt
from deltahub.errors import CodecError

# Candidate clipping ratios for the scale search (1.0 = the group's absolute maximum). Deltas are
# heavy-tailed: at 2 bits the best ratio is often below 0.5 (a Student-t(3) delta: 0.3-0.4, halving
# the layer-output error of obs 2-bit 2:4 against a 0.52 floor), so the grid goes down to 0.12.
CLIP_RATIOS = tuple(round(1.0 - 0.04 * i, 2) for i in range(23))


@dataclass(frozen=True)
class CodecSettings:
    """Settings of one codec run, shared by all tensors of a group.

    ``bits``/``sparsity``/``group_size`` as in :class:`~deltahub.format.QuantLayout`; codecs that
    do not quantize ignore them. ``options`` holds method-specific knobs (JSON-serialisable),
    e.g. ``{"damp": 0.01, "block_size": 128}`` for obs.
    """

    bits: int = 4
    sparsity: str = "2:4"
    group_size: int | None = None
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"bits": self.bits, "sparsity": self.sparsity, "group_size": self.group_size, **self.options}


class Codec(ABC):
    """One compression method. Instances are cheap and stateless between tensors."""

    name: ClassVar[str] = ""
    #: True if ``compress`` uses the Hessian (the pipeline then runs calibration passes).
    needs_calibration: ClassVar[bool] = False
    #: True if rows are compressed independently, so the pipeline may compress a tall matrix
    #: (an embedding) in row chunks and concatenate the qlinear parts to bound memory.
    row_separable: ClassVar[bool] = False
    #: Method-specific options and their defaults (anything else in settings.options is refused).
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, settings: CodecSettings | None = None) -> None:
        settings = settings or CodecSettings()
        unknown = set(settings.options) - set(self.default_options)
        if unknown:
            raise CodecError(f"codec {self.name!r} has no option(s) {sorted(unknown)}; "
                             f"known: {sorted(self.default_options) or 'none'}")
        self.settings = settings
        self.options = {**self.default_options, **settings.options}

    @abstractmethod
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        """Δ [N, K] (any float dtype/device) and optional H [K, K] -> PackedTensor of shape (N, K)
        with parts on Δ's device."""

    def decompress(self, packed: fmt.PackedTensor) -> torch.Tensor:
        """Δ̂ as float32 [N, K] (``extra_rows`` excluded)."""
        return fmt.dequantize(packed)

    def nbytes(self, packed: fmt.PackedTensor) -> int:
        """Bytes the packed tensor occupies before the lossless stage."""
        return packed.nbytes

    def describe(self) -> dict[str, Any]:
        """The settings as recorded in delta_config.json."""
        return {"codec": self.name, **self.settings.to_dict(), **self.options}


class QuantCodec(Codec):
    """Base of codecs producing ``qlinear`` tensors with per-row/group scales: validates the
    layout once. Rows are independent (set ``row_separable = False`` if a subclass couples them)."""

    row_separable = True

    def __init__(self, settings: CodecSettings | None = None) -> None:
        super().__init__(settings)
        s = self.settings
        self.layout = fmt.QuantLayout(s.bits, s.sparsity, s.group_size)

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, **self.layout.to_dict(), **self.options}


# ----------------------------------------------------------------------------------------------
# Shared helpers (all shapes use the padded width Kp = layout.padded_k(K))


def pad_columns(delta: torch.Tensor, kp: int) -> torch.Tensor:
    """Δ [N, K] -> float32 [N, Kp], zero-padded on the right."""
    w = delta.to(torch.float32)
    if w.shape[1] == kp:
        return w.clone()
    return torch.nn.functional.pad(w, (0, kp - w.shape[1]))


def pad_hessian(hessian: torch.Tensor, kp: int) -> torch.Tensor:
    """H [K, K] -> float32 [Kp, Kp] with an identity block on the padding."""
    k = hessian.shape[0]
    h = torch.eye(kp, dtype=torch.float32, device=hessian.device)
    h[:k, :k] = hessian.to(torch.float32)
    return h


def group_index(layout: fmt.QuantLayout, k: int, kp: int, device: torch.device | str) -> torch.Tensor:
    """Scale group of every padded input column: [Kp] int64 in [0, n_groups)."""
    cols = torch.arange(kp, device=device)
    if layout.group_size is None:
        return torch.zeros_like(cols)
    return (cols // layout.group_size).clamp_(max=layout.n_groups(k) - 1)


class DeviceGenerators:
    """``gens(device)`` -> a torch.Generator for that device, all seeded with ``seed`` and created on
    first use: a codec's random draws repeat run to run, in the order its tensors are compressed."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._gens: dict[str, torch.Generator] = {}

    def __call__(self, device: torch.device | str) -> torch.Generator:
        key = str(device)
        if key not in self._gens:
            self._gens[key] = torch.Generator(device=device).manual_seed(self.seed)
        return self._gens[key]


def keep_two_of_four(saliency: torch.Tensor) -> torch.Tensor:
    """Saliency [N, M] (M a multiple of 4) -> bool mask keeping the 2 largest of every 4."""
    n, m = saliency.shape
    top = saliency.reshape(n, m // 4, 4).topk(2, dim=-1).indices
    mask = torch.zeros(n, m // 4, 4, dtype=torch.bool, device=saliency.device)
    mask.scatter_(-1, top, True)
    return mask.reshape(n, m)


def fake_quant(w: torch.Tensor, scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize ``w`` with broadcastable ``scales`` -> (codes uint8, dequantized float32)."""
    codes = fmt.quantize_codes(w, scales, bits)
    return codes, fmt.dequantize_codes(codes, scales, bits)


def search_scales(w: torch.Tensor, keep: torch.Tensor | None, bits: int, gidx: torch.Tensor,
                  n_groups: int, ratios: tuple[float, ...] = CLIP_RATIOS) -> torch.Tensor:
    """Per (row, group) scale minimising the squared quantization error of the kept entries.

    Shape: w [N, M] float32; keep [N, M] bool or None (all kept); gidx [M] int64 group of each
    column -> scales [N, n_groups] float32. Candidates are ``ratio * absmax / max_level``
    (clipping); groups with no non-zero kept entry get scale 0. One bit has a closed form: the
    codes are the signs whatever the scale, and ±mean|w| (scale 2 mean|w|) minimises the error
    (the clipping grid stops at 0.12 absmax, above mean|w| for long heavy-tailed rows).
    """
    a = w.abs() if keep is None else w.abs() * keep
    if n_groups == 1:
        absmax = a.amax(1, keepdim=True)

        def per_group(e: torch.Tensor) -> torch.Tensor:
            return e.sum(1, keepdim=True)
    else:
        absmax = torch.zeros(w.shape[0], n_groups, device=w.device)
        absmax.scatter_reduce_(1, gidx.expand(w.shape[0], -1), a, "amax")

        def per_group(e: torch.Tensor) -> torch.Tensor:
            return torch.zeros_like(absmax).index_add_(1, gidx, e)

    if bits == 1:
        count = per_group(torch.ones_like(a) if keep is None else keep.to(a.dtype))
        return torch.where(absmax > 0, 2 * per_group(a) / count.clamp_min(1), torch.zeros_like(absmax))

    max_level = (2**bits - 1) / 2
    best = torch.full_like(absmax, math.inf)
    best_scale = absmax / max_level
    for r in ratios:
        s = absmax * (r / max_level)
        _, q = fake_quant(w, s if n_groups == 1 else s.index_select(1, gidx), bits)
        e = (q - w).square_()
        if keep is not None:
            e.mul_(keep)
        err = per_group(e)
        better = err < best
        best = torch.where(better, err, best)
        best_scale = torch.where(better, s, best_scale)
    return best_scale


def pack_dense_codes(codes: torch.Tensor, keep: torch.Tensor | None, scales: torch.Tensor,
                     layout: fmt.QuantLayout, shape: tuple[int, int], codec: str) -> fmt.PackedTensor:
    """Codes at every padded position [N, Kp] (+ 2:4 mask [N, Kp]) -> qlinear PackedTensor."""
    n = codes.shape[0]
    if layout.sparse:
        assert keep is not None
        indices = fmt.mask_to_indices(keep)
        kept = codes[keep].reshape(n, -1)  # row-major: kept values in increasing k
        return fmt.pack_qlinear(kept, scales, layout, shape, indices, codec=codec)
    return fmt.pack_qlinear(codes, scales, layout, shape, codec=codec)


def row_chunks(n: int, kp: int, device: torch.device | str = "cpu", budget_bytes: int | None = None
               ) -> list[slice]:
    """Row slices for processing an [n, kp] float32 matrix in bounded pieces (rows are
    independent for row-separable codecs) of ``budget_bytes`` (default ~4 MB on the CPU,
    ~512 MB on a GPU)."""
    if budget_bytes is None:
        budget_bytes = (512 << 20) if torch.device(device).type == "cuda" else (4 << 20)
    step = max(1, min(n, budget_bytes // (4 * kp)))
    return [slice(r, min(r + step, n)) for r in range(0, n, step)]


def concat_packed(chunks: list[fmt.PackedTensor], shape: tuple[int, int]) -> fmt.PackedTensor:
    """Row-wise concatenation of qlinear chunks of one matrix."""
    if len(chunks) == 1:
        return chunks[0]
    first = chunks[0]
    parts = {p: torch.cat([c.parts[p] for c in chunks]) for p in first.parts}
    return fmt.PackedTensor("qlinear", shape, parts, codec=first.codec, layout=first.layout)

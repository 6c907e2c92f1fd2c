"""``dare``: random drop + rescale (DARE, Yu et al. 2023), then round-to-nearest quantization.

Every delta entry is dropped with probability ``p`` and the survivors are multiplied by
1 / (1 - p), so the delta is unbiased in expectation; the survivors are then quantized like
``rtn`` (clipping search for the scales, no calibration).

* ``sparsity="2:4"`` (the default, what the SBMM kernels read): the drop is *structured* random:
  each group of 4 inputs keeps 2 entries chosen uniformly at random, so ``p`` is exactly 0.5 (any
  other ``p`` is refused) and the stored tensor has the same bytes as ``obs``/``rtn`` 2:4.
* ``sparsity="none"``: i.i.d. Bernoulli drop with any 0 <= p < 1. The format's mid-rise grid has
  no zero level, so a dropped entry is stored as ±half a step (sign at random, zero mean); the
  dense layout saves no bytes by dropping, so this variant is a reference point only.

Options: ``p`` (0.5), ``seed`` (0): tensors are drawn from one generator in the order compressed,
so a run is reproducible.
"""

from __future__ import annotations

import torch

from deltahub import format as fmt
from deltahub.codecs.base import (
    CodecSettings,
    DeviceGenerators,
    QuantCodec,
    concat_packed,
    fake_quant,
    group_index,
    keep_two_of_four,
    pack_dense_codes,
    pad_columns,
    row_chunks,
    search_scales,
)
from deltahub.errors import CodecError


class DareCodec(QuantCodec):
    """Random drop (2:4-structured for p = 0.5) + rescale + round-to-nearest."""

    name = "dare"
    needs_calibration = False
    default_options = {"p": 0.5, "seed": 0}

    def __init__(self, settings: CodecSettings | None = None) -> None:
        super().__init__(settings)
        self.p = float(self.options["p"])
        if not 0.0 <= self.p < 1.0:
            raise CodecError(f"dare: drop probability p must be in [0, 1), got {self.p}")
        if self.layout.sparse and self.p != 0.5:
            raise CodecError(
                f"dare with 2:4 sparsity drops exactly half (p=0.5), got p={self.p}; "
                "use sparsity 'none' for other rates"
            )
        self._gen = DeviceGenerators(int(self.options["seed"]))

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        layout = self.layout
        n, k = delta.shape
        kp = layout.padded_k(k)
        gidx = group_index(layout, k, kp, delta.device)
        gen = self._gen(delta.device)
        rescale = 1.0 / (1.0 - self.p)
        chunks = []
        for rows in row_chunks(n, kp):
            w = pad_columns(delta[rows], kp)
            u = torch.rand(w.shape, generator=gen, device=w.device)
            keep = keep_two_of_four(u) if layout.sparse else u >= self.p
            w = w * keep * rescale
            scales = search_scales(w, keep, layout.bits, gidx, layout.n_groups(k))
            codes, _ = fake_quant(w, scales[:, gidx], layout.bits)
            if layout.sparse:
                chunks.append(pack_dense_codes(codes, keep, scales, layout, (w.shape[0], k), self.name))
                continue
            # dropped entries: the grid level on either side of zero, at random (zero mean)
            up = torch.rand(w.shape, generator=gen, device=w.device) < 0.5
            z = (2**layout.bits - 1) // 2  # the code just below zero; z + 1 is just above
            near_zero = torch.where(up, z + 1, z).to(torch.uint8)
            codes = torch.where(keep, codes, near_zero)
            chunks.append(pack_dense_codes(codes, None, scales, layout, (w.shape[0], k), self.name))
        packed = concat_packed(chunks, (n, k))
        packed.info = {"p": self.p}
        return packed

"""``rtn``: round-to-nearest quantization of the delta, no calibration.

2:4 keeps the two largest-magnitude entries of every group of four inputs; scales come from the
shared clipping search on the kept entries. Same packing as ``obs``: it is the fast path and the
baseline ``obs`` is measured against.
"""

from __future__ import annotations

import torch

from deltahub import format as fmt
from deltahub.codecs.base import (
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


class RtnCodec(QuantCodec):
    """Magnitude 2:4 mask + round-to-nearest on a symmetric mid-rise grid."""

    name = "rtn"
    needs_calibration = False

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        layout = self.layout
        n, k = delta.shape
        kp = layout.padded_k(k)
        gidx = group_index(layout, k, kp, delta.device)
        chunks = []
        for rows in row_chunks(n, kp, delta.device):
            w = pad_columns(delta[rows], kp)
            keep = keep_two_of_four(w.abs()) if layout.sparse else None
            scales = search_scales(w, keep, layout.bits, gidx, layout.n_groups(k))
            codes, _ = fake_quant(w, scales.index_select(1, gidx), layout.bits)
            chunks.append(pack_dense_codes(codes, keep, scales, layout, (w.shape[0], k), self.name))
        return concat_packed(chunks, (n, k))

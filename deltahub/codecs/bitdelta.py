"""``bitdelta``: sign of the delta times one scale per matrix (BitDelta, Liu et al. 2024).

Stored as a dense 1-bit ``qlinear`` with one scale per output row, all rows holding the same
value: code 1 -> +α, code 0 -> -α (the format's mid-rise grid with scale 2α). α = mean |Δ|
minimises ||Δ - α sign(Δ)||². Settings ``bits``/``sparsity``/``group_size`` are ignored.

Optional scale distillation (:func:`deltahub.distill.distill_scales`, run after compression on a
finished delta folder): the per-matrix α are trained (in log space, Adam) so that base + α·sign(Δ)
matches the fine-tune's next-token distribution (KL divergence) on calibration text; the signs
stay fixed. (``distill_scales`` is re-exported here.)
"""

from __future__ import annotations

from typing import Any

import torch

from deltahub import format as fmt
from deltahub.codecs.base import Codec, pad_columns
from deltahub.distill import distill_scales

__all__ = ["BitDeltaCodec", "distill_scales"]

LAYOUT = fmt.QuantLayout(bits=1, sparsity="none", group_size=None)


class BitDeltaCodec(Codec):
    """sign(Δ) x α with α = mean|Δ| per matrix (no calibration)."""

    name = "bitdelta"
    needs_calibration = False

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        n, k = delta.shape
        w = pad_columns(delta, LAYOUT.padded_k(k))
        alpha = float(delta.to(torch.float32).abs().mean()) if delta.numel() else 0.0
        codes = (w >= 0).to(torch.uint8)
        scales = torch.full((n, 1), 2.0 * alpha, dtype=torch.float32, device=w.device)
        return fmt.pack_qlinear(codes, scales, LAYOUT, (n, k), codec=self.name)

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, **LAYOUT.to_dict()}

"""``lowrank``: truncated SVD of the delta, Δ ≈ lora_B @ lora_A (served by the SGMV kernel).

Shape: Δ [N, K] -> ``lora_A`` [r, K], ``lora_B`` [N, r] (bf16 by default), the singular values
split evenly between the factors (A = √S Vᵀ, B = U √S). The rank is either given (``rank``) or
chosen as the largest that fits a byte budget of ``bits_per_weight`` bits per delta entry:
r = floor(bits_per_weight * N * K / 8 / ((N + K) * bytes per factor element)), at most min(N, K)
(r = 0 stores an empty pair: the delta is dropped). Settings ``bits``/``sparsity``/``group_size``
are ignored. No calibration (plain SVD; the Hessian, if given, is not used).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from deltahub import format as fmt
from deltahub.codecs.base import Codec, CodecSettings
from deltahub.errors import CodecError

_FACTOR_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def rank_for_budget(n: int, k: int, bits_per_weight: float, element_bytes: int = 2) -> int:
    """Largest r with (N + K) * r * element_bytes <= bits_per_weight * N * K / 8."""
    budget = bits_per_weight * n * k / 8
    return max(0, min(min(n, k), math.floor(budget / ((n + k) * element_bytes))))


class LowRankCodec(Codec):
    """Truncated SVD. Options: ``rank`` (int) or ``bits_per_weight`` (float, default 2.0),
    ``dtype`` of the factors (bfloat16)."""

    name = "lowrank"
    needs_calibration = False
    default_options = {"rank": None, "bits_per_weight": 2.0, "dtype": "bfloat16"}

    def __init__(self, settings: CodecSettings | None = None) -> None:
        super().__init__(settings)
        dtype = self.options["dtype"]
        if dtype not in _FACTOR_DTYPES:
            raise CodecError(f"lowrank: dtype must be one of {sorted(_FACTOR_DTYPES)}, got {dtype!r}")
        self.dtype = _FACTOR_DTYPES[dtype]
        rank, bpw = self.options["rank"], self.options["bits_per_weight"]
        if rank is not None and (not isinstance(rank, int) or rank < 0):
            raise CodecError(f"lowrank: rank must be a non-negative integer, got {rank!r}")
        if rank is None and (bpw is None or float(bpw) <= 0):
            raise CodecError(f"lowrank: bits_per_weight must be > 0, got {bpw!r}")

    def rank(self, n: int, k: int) -> int:
        """Rank used for an [n, k] delta."""
        if self.options["rank"] is not None:
            return min(int(self.options["rank"]), n, k)
        elt = torch.empty(0, dtype=self.dtype).element_size()
        return rank_for_budget(n, k, float(self.options["bits_per_weight"]), elt)

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        n, k = delta.shape
        r = self.rank(n, k)
        w = delta.to(torch.float32)
        if r == 0 or not bool(w.any()):
            a = torch.zeros(r, k, dtype=self.dtype, device=w.device)
            b = torch.zeros(n, r, dtype=self.dtype, device=w.device)
        else:
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            root = s[:r].sqrt()
            a = (root[:, None] * vh[:r]).to(self.dtype).contiguous()
            b = (u[:, :r] * root[None, :]).to(self.dtype).contiguous()
        return fmt.PackedTensor(
            "lowrank", (n, k), {"lora_A": a, "lora_B": b}, codec=self.name, info={"rank": r}
        )

    def describe(self) -> dict[str, Any]:
        return {"codec": self.name, **self.options}

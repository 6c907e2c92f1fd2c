"""``obs`` (default): SparseGPT 2:4 pruning + GPTQ quantization of the delta, with error feedback.

For a delta Δ [N, K] of a linear layer and its calibration Hessian H = 2 X Xᵀ / n [K, K]:

1. Damp H (``damp`` x mean diagonal, more if Cholesky fails), give dead inputs (H_ii = 0) a unit
   diagonal and zero their weights; pad K to Kp with an identity block.
2. U = upper Cholesky factor of H⁻¹. Columns are processed left to right in lazy blocks of
   ``block_size``: at the start of every group of 4 columns the 2:4 mask keeps the two entries of
   largest OBS saliency w² / U_jj² (U_jj² is [H_F⁻¹]_jj over the columns F not yet fixed); each
   column is then quantized (pruned entries are 0) and its error e = (w - q) / U_jj is spread
   over the remaining columns of the block (w_F -= e U_jF); a block's accumulated errors update
   the columns right of it in one matmul.
3. Scales: per output row from the full (padded) row, or per group of ``group_size`` inputs
   computed when the group starts (from the error-updated weights); each is the clipping ratio
   with least squared error on the entries a provisional saliency mask keeps.

Without a Hessian (embeddings) every column is independent and this reduces to ``rtn``.
"""

from __future__ import annotations

import torch

from deltahub import format as fmt
from deltahub.codecs.base import (
    CodecSettings,
    QuantCodec,
    concat_packed,
    fake_quant,
    group_index,
    keep_two_of_four,
    pack_dense_codes,
    pad_columns,
    pad_hessian,
    row_chunks,
    search_scales,
)
from deltahub.codecs.rtn import RtnCodec
from deltahub.errors import CodecError


def _inverse_factor(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of h⁻¹, consuming ``h``; None if h is not positive definite.
    On the CPU, LAPACK works in place, so only one Kp x Kp buffer is used."""
    if h.device.type == "cpu":
        info = torch.empty((), dtype=torch.int32)
        torch.linalg.cholesky_ex(h, out=(h, info))
        if int(info):
            return None
        torch.cholesky_inverse(h, out=h)
        torch.linalg.cholesky_ex(h, upper=True, out=(h, info))
        return None if int(info) else h
    chol, info = torch.linalg.cholesky_ex(h)
    del h
    if int(info):
        return None
    u, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(chol), upper=True)
    return None if int(info) else u


def inverse_cholesky(hessian: torch.Tensor, kp: int, damp: float) -> tuple[torch.Tensor, torch.Tensor]:
    """H [K, K] -> (U [Kp, Kp] float32 upper Cholesky factor of (H' + λI)⁻¹, dead [Kp] bool),
    H' = H padded with an identity block to Kp and a unit diagonal on dead inputs (H_ii = 0).

    λ = ``damp`` x mean(diag H'), multiplied by 10 until the factorisation succeeds.
    """
    lam = None
    for _ in range(6):
        h = pad_hessian(hessian, kp)
        diag = h.diagonal()
        dead = diag == 0
        diag[dead] = 1.0
        if lam is None:
            lam = damp * float(diag.mean())
        diag.add_(lam)
        del diag
        u = _inverse_factor(h)
        if u is not None:
            return u, dead
        lam = max(lam * 10, 1e-8)
    raise CodecError("calibration Hessian is not positive definite even after damping; "
                     "check the calibration data (NaN/inf activations?)")


class ObsCodec(QuantCodec):
    """SparseGPT/GPTQ with error feedback. Options: ``damp`` (0.01), ``block_size`` (128)."""

    name = "obs"
    needs_calibration = True
    default_options = {"damp": 0.01, "block_size": 128}

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        if hessian is None:
            s = self.settings
            return RtnCodec(CodecSettings(s.bits, s.sparsity, s.group_size)).compress(delta)
        n, k = delta.shape
        if tuple(hessian.shape) != (k, k):
            raise CodecError(f"Hessian of shape {tuple(hessian.shape)} does not match delta [{n}, {k}]")
        kp = self.layout.padded_k(k)
        u, dead = inverse_cholesky(hessian.to(delta.device), kp, float(self.options["damp"]))
        chunks = []
        results = []
        for rows in row_chunks(n, kp, delta.device):
            w = pad_columns(delta[rows], kp)
            w[:, dead] = 0
            results.append(self._quantize_rows(w, u, k))
            del w
        del u  # free the Kp x Kp factor before packing
        for codes, keep, scales in results:
            chunks.append(pack_dense_codes(codes, keep, scales, self.layout, (codes.shape[0], k), self.name))
        return concat_packed(chunks, (n, k))

    def _quantize_rows(self, w: torch.Tensor, u: torch.Tensor, k: int):
        """w [n, Kp] (modified in place), U [Kp, Kp] -> codes [n, Kp], keep mask or None, scales."""
        lay = self.layout
        n, kp = w.shape
        bits, gs, n_groups = lay.bits, lay.group_size, lay.n_groups(k)
        gidx = group_index(lay, k, kp, w.device).tolist()
        diag = torch.diag(u)
        codes = torch.empty(n, kp, dtype=torch.uint8, device=w.device)
        keep = torch.zeros(n, kp, dtype=torch.bool, device=w.device) if lay.sparse else None

        def scale_of(values: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
            prov = keep_two_of_four(values.square() / d.square()) if lay.sparse else None
            one = torch.zeros(values.shape[1], dtype=torch.int64, device=w.device)
            return search_scales(values, prov, bits, one, 1)[:, 0]

        scales = torch.zeros(n, n_groups, device=w.device)
        if gs is None:
            scales[:, 0] = scale_of(w, diag)
        block = int(self.options["block_size"])
        block = max(4, block - block % 4)
        for i1 in range(0, kp, block):
            i2 = min(i1 + block, kp)
            w1 = w[:, i1:i2].clone()
            err1 = torch.empty_like(w1)
            u1 = u[i1:i2, i1:i2]
            d1 = diag[i1:i2]
            for i in range(i2 - i1):
                col = i1 + i
                if gs is not None and col % gs == 0 and col // gs < n_groups:
                    end = kp if col // gs == n_groups - 1 else col + gs
                    vals = w1[:, i : i + end - col] if end <= i2 else torch.cat([w1[:, i:], w[:, i2:end]], 1)
                    scales[:, col // gs] = scale_of(vals, diag[col:end])
                if keep is not None and i % 4 == 0:
                    sal = w1[:, i : i + 4].square() / d1[i : i + 4].square()
                    keep[:, col : col + 4] = keep_two_of_four(sal)
                x = w1[:, i]
                c, q = fake_quant(x, scales[:, gidx[col]], bits)
                if keep is not None:
                    q = q * keep[:, col]
                codes[:, col] = c
                e = (x - q) / d1[i]
                w1[:, i:].addr_(e, u1[i, i:], alpha=-1)
                err1[:, i] = e
            if i2 < kp:
                w[:, i2:].addmm_(err1, u[i1:i2, i2:], alpha=-1)
        return codes, keep, scales


"""``obs`` (default): SparseGPT 2:4 pruning + GPTQ quantization of the delta, with error feedback.

For a delta Δ [N, K] of a linear layer and its calibration Hessian H = 2 X Xᵀ / n [K, K]:

1. Damp H (``damp`` x mean diagonal, more if Cholesky fails), give dead inputs (H_ii = 0) a unit
   diagonal and zero their weights; pad K to Kp with an identity block.
2. U = upper Cholesky factor of H⁻¹. Columns are processed left to right in lazy blocks of
   ``block_size``: at the start of every group of 4 columns the 2:4 mask (``mask="obs"``, step 5)
   keeps the two entries of largest OBS saliency w² / U_jj² (U_jj² is [H_F⁻¹]_jj over the
   columns F not yet fixed); each column is then quantized (pruned entries are 0) and its error
   e = (w - q) / U_jj is spread over the remaining columns of the block (w_F -= e U_jF); a
   block's accumulated errors update the columns right of it in one matmul.
3. Scales: per output row from the full (padded) row, or per group of ``group_size`` inputs
   computed when the group starts (from the error-updated weights); each is the clipping ratio
   with least squared error on the entries a provisional saliency mask keeps.
4. ``act_order`` (default on; per-row scales only): the groups of 4 inputs are processed in
   decreasing order of their total H_ii, so the columns that matter most are fixed first and their
   errors land on columns that matter less (the 2:4 groups themselves are unchanged). Held-out
   layer-output error on SmolLM2-135M inputs (benchmarks/layer_study.py): -0.2 to -3.8 % at
   4 bits, +0.3 to -11 % at 2 bits.
5. ``mask``: which 2:4 mask. ``"obs"``: by saliency, as in step 2. ``"random"``: drawn at random
   (two of every four, uniformly, as ``dare``), the kept entries doubled (unbiased in
   expectation); steps 2-3 then only quantize, with the mask fixed: the error feedback spreads
   quantization errors, not pruned weights (``seed``, 0: one generator per codec, drawn in the
   order tensors are compressed). ``"auto"`` (default) is ``"random"`` for 2:4 at >= 3 bits and
   ``"obs"`` at <= 2 bits; dense layouts have no mask (recorded as None). Why: held-out
   perplexity on four real fine-tunes of SmolLM2-135M (docs/benchmarks/README.md, runs 5 and 9):
   4-bit 2:4 +0.13-0.26 % random vs +0.68-0.90 % saliency, with fewer bytes, although the random
   mask's layer error is larger (our reading: the saliency mask's per-layer shrinkage adds up
   over layers); 2-bit 2:4 +1.23-1.59 % saliency vs +1.94-2.78 % random (the doubled values'
   quantization error dominates). 3 bits follows 4 (not measured with the random mask;
   saliency 3-bit ≈ 4-bit). One model family: on the tests' tiny 2-layer toy fine-tunes the
   saliency mask does better at 4 bits (``deltahub demo`` pins it). ``describe()`` records the
   resolved value.
6. ``rescale`` (default off): each row's scales are multiplied by β = Δ H Δᵀ / Δ̂ H Δᵀ (clamped
   to [0.5, 2]), so the row's output Δ̂x has the right projection on the fine-tune's Δx over the
   calibration inputs. The least-squares result of steps 1-3 is shrunk (2:4 pruning drops part of
   Δx, and what is dropped is correlated with what is kept); β removes that shrinkage at the cost
   of a larger, but unbiased, layer error.

Without a Hessian (embeddings) every column is independent and this reduces to ``rtn`` (whose
2:4 mask keeps the two largest magnitudes, whatever ``mask`` says).
"""

from __future__ import annotations

import math

import torch

from deltahub import format as fmt
from deltahub.codecs.base import (
    CodecSettings,
    DeviceGenerators,
    QuantCodec,
    concat_packed,
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


def group_order(hessian: torch.Tensor, kp: int) -> torch.Tensor:
    """H [K, K] -> permutation [Kp] (int64) of the padded inputs that keeps each group of 4
    together and orders the groups by decreasing sum of H_ii (padding counts 0)."""
    d = torch.zeros(kp, device=hessian.device)
    d[: hessian.shape[0]] = hessian.diagonal().to(torch.float32)
    groups = torch.argsort(d.view(-1, 4).sum(1), descending=True, stable=True)
    return (groups[:, None] * 4 + torch.arange(4, device=d.device)).flatten()


def _permute_symmetric_(h: torch.Tensor, perm: torch.Tensor, rows: int = 256) -> None:
    """h <- h[perm][:, perm] in place for a symmetric h [Kp, Kp], with [rows, Kp] temporaries:
    permute the columns, then the columns of the transpose (= the rows, by symmetry)."""
    for view in (h, h.t()):
        for r in range(0, h.shape[0], rows):
            view[r : r + rows] = view[r : r + rows].index_select(1, perm)


def inverse_cholesky(hessian: torch.Tensor, kp: int, damp: float, perm: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """H [K, K] -> (U [Kp, Kp] float32 upper Cholesky factor of (H' + λI)⁻¹, dead [Kp] bool),
    H' = H padded with an identity block to Kp (then permuted as ``perm`` [Kp] says, if given)
    and a unit diagonal on dead inputs (H_ii = 0).

    λ = ``damp`` x mean(diag H'), multiplied by 10 until the factorisation succeeds.
    """
    lam = None
    for _ in range(6):
        h = pad_hessian(hessian, kp)
        if perm is not None:
            _permute_symmetric_(h, perm)
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


def signal_rescale(delta: torch.Tensor, codes: torch.Tensor, keep: torch.Tensor | None, scales: torch.Tensor,
                   hessian: torch.Tensor, layout: fmt.QuantLayout) -> torch.Tensor:
    """Scales [N, G] x β [N, 1], β = Δ H Δᵀ / Δ̂ H Δᵀ per row clamped to [0.5, 2] (1 where either
    is not positive). Shapes: delta [N, K]; codes, keep [N, Kp] (stored input order); H [K, K]."""
    k = delta.shape[1]
    unit = codes[:, :k].to(torch.float32) - (2**layout.bits - 1) / 2
    if keep is not None:
        unit.mul_(keep[:, :k])
    gidx = group_index(layout, k, k, delta.device)
    q = unit.mul_(scales[:, gidx])
    delta = delta.to(torch.float32)
    hd = delta @ hessian.to(delta.device, torch.float32)  # [N, K]
    num, den = (hd * delta).sum(1), (hd * q).sum(1)
    ok = (num > 0) & (den > 0)
    beta = torch.where(ok, num / torch.where(ok, den, 1.0), 1.0).clamp_(0.5, 2.0)
    return scales * beta[:, None]


MASKS = ("auto", "obs", "random")


def resolve_mask(mask: object, layout: fmt.QuantLayout) -> str | None:
    """The ``mask`` option as used: "obs" / "random" for a 2:4 layout (``"auto"``: "random" at
    >= 3 bits, "obs" at <= 2; step 5), None for a dense one (no mask; explicit "obs" is kept).
    CodecError for any other value, or "random" without 2:4."""
    if mask not in MASKS:
        raise CodecError(f"obs: mask must be one of {', '.join(map(repr, MASKS))}, got {mask!r}")
    if not layout.sparse:
        if mask == "random":
            raise CodecError("obs: mask='random' needs sparsity 2:4")
        return None if mask == "auto" else "obs"
    if mask == "auto":
        return "random" if layout.bits >= 3 else "obs"
    return str(mask)


class ObsCodec(QuantCodec):
    """SparseGPT/GPTQ with error feedback. Options: ``damp`` (0.01), ``block_size`` (128),
    ``act_order`` (True: groups of 4 inputs in decreasing H_ii order; per-row scales only),
    ``mask`` ("auto", "obs" or "random"; 2:4 only) and ``seed`` (0), ``rescale`` (False): steps
    5-6 of the module docstring. ``self.options["mask"]`` holds the resolved mask."""

    name = "obs"
    needs_calibration = True
    default_options = {"damp": 0.01, "block_size": 128, "act_order": True, "mask": "auto", "seed": 0,
                       "rescale": False}

    def __init__(self, settings: CodecSettings | None = None) -> None:
        super().__init__(settings)
        self.options["mask"] = resolve_mask(self.options["mask"], self.layout)
        self._gen = DeviceGenerators(int(self.options["seed"]))

    @torch.no_grad()
    def compress(self, delta: torch.Tensor, hessian: torch.Tensor | None = None) -> fmt.PackedTensor:
        if hessian is None:
            s = self.settings
            return RtnCodec(CodecSettings(s.bits, s.sparsity, s.group_size)).compress(delta)
        n, k = delta.shape
        if tuple(hessian.shape) != (k, k):
            raise CodecError(f"Hessian of shape {tuple(hessian.shape)} does not match delta [{n}, {k}]")
        kp = self.layout.padded_k(k)
        hessian = hessian.to(delta.device)
        perm = None
        if self.options["act_order"] and self.layout.group_size is None:
            perm = group_order(hessian, kp)
        u, dead = inverse_cholesky(hessian, kp, float(self.options["damp"]), perm)
        chunks = []
        results = []
        slices = row_chunks(n, kp, delta.device)
        for rows in slices:
            w = pad_columns(delta[rows], kp)
            if perm is not None:
                w = w.index_select(1, perm)
            w[:, dead] = 0
            mask = None
            if self.options["mask"] == "random":
                mask = keep_two_of_four(torch.rand(w.shape, generator=self._gen(w.device), device=w.device))
                w.mul_(mask).mul_(2.0)
            results.append(self._quantize_rows(w, u, k, mask))
            del w
        del u  # free the Kp x Kp factor before packing
        if perm is not None:  # back to the stored (input) order
            inv = torch.argsort(perm)
            results = [(c.index_select(1, inv), None if m is None else m.index_select(1, inv), sc)
                       for c, m, sc in results]
        if self.options["rescale"]:
            results = [(c, m, signal_rescale(delta[rows], c, m, sc, hessian, self.layout))
                       for (c, m, sc), rows in zip(results, slices, strict=True)]
        for codes, keep, scales in results:
            chunks.append(pack_dense_codes(codes, keep, scales, self.layout, (codes.shape[0], k), self.name))
        return concat_packed(chunks, (n, k))

    def _quantize_rows(self, w: torch.Tensor, u: torch.Tensor, k: int, mask: torch.Tensor | None = None):
        """w [n, Kp] (modified in place), U [Kp, Kp], a fixed 2:4 mask [n, Kp] or None (chosen by
        saliency) -> codes [n, Kp], keep mask or None, scales.

        Each lazy block runs through ``deltahub.kernels.obs_block`` (Triton on CUDA, the torch
        reference on the CPU); the block's errors then update the columns right of it in one
        matmul. With group scales the block is cut so that groups start at block starts, and a
        group's scale is searched when its first block starts (from the error-updated weights).
        """
        from deltahub.kernels import obs_block

        lay = self.layout
        n, kp = w.shape
        bits, gs, n_groups = lay.bits, lay.group_size, lay.n_groups(k)
        gidx = group_index(lay, k, kp, w.device).tolist()
        diag = torch.diag(u)
        # column-major outputs: the kernel stores one column of all rows at a time
        codes = torch.empty(kp, n, dtype=torch.uint8, device=w.device).t()
        keep = torch.empty(kp, n, dtype=torch.bool, device=w.device).t() if lay.sparse else None
        if mask is not None:
            keep.copy_(mask)

        def scale_of(values: torch.Tensor, d: torch.Tensor, cols: slice) -> torch.Tensor:
            if mask is not None:
                prov = mask[:, cols]
            else:
                prov = keep_two_of_four(values.square() / d.square()) if lay.sparse else None
            one = torch.zeros(values.shape[1], dtype=torch.int64, device=w.device)
            return search_scales(values, prov, bits, one, 1)[:, 0]

        scales = torch.zeros(n, n_groups, device=w.device)
        if gs is None:
            scales[:, 0] = scale_of(w, diag, slice(None))
        block = int(self.options["block_size"])
        block = max(4, block - block % 4)
        if gs is not None:
            block = math.gcd(block, gs)  # a power of two >= 4 dividing the group size
        err_t = torch.empty(block, n, device=w.device)
        for i1 in range(0, kp, block):
            i2 = min(i1 + block, kp)
            if gs is not None and i1 % gs == 0 and i1 // gs < n_groups:
                g = i1 // gs
                end = kp if g == n_groups - 1 else i1 + gs
                scales[:, g] = scale_of(w[:, i1:end], diag[i1:end], slice(i1, end))
            err = err_t[: i2 - i1].t()
            obs_block(w[:, i1:i2], u[i1:i2, i1:i2], scales[:, gidx[i1]], bits=bits, sparse=lay.sparse,
                      codes=codes[:, i1:i2], keep=None if keep is None else keep[:, i1:i2], err=err,
                      fixed_mask=mask is not None)
            if i2 < kp:
                w[:, i2:].addmm_(err, u[i1:i2, i2:], alpha=-1)
        return codes.contiguous(), None if keep is None else keep.contiguous(), scales

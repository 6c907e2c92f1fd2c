"""One lazy block of the OBS column loop (SparseGPT 2:4 pruning + GPTQ quantization), in Triton.

Semantics: for j = 0 .. B-1 in order, every row independently (w is a working copy):
    if sparse and j % 4 == 0: keep[:, j:j+4] = 2 largest of w[:, j:j+4]² / diag(u)[j:j+4]²
                              (with fixed_mask=True: keep is an input, read as given)
    codes[:, j] = quantize_codes(w[:, j], scale, bits)        (deltahub.format, mid-rise grid)
    err[:, j] = e = (w[:, j] - dequant(codes[:, j]) * keep[:, j]) / u[j, j]
    w[:, j:] -= e ⊗ u[j, j:]
Shape: w [n, B] float32 (read only); u [B, B] float32 upper triangular (the diagonal block of the
inverse Cholesky factor); scale [n] float32 (one per row for the whole block) -> codes [n, B] uint8,
keep [n, B] bool (2:4 only), err [n, B] float32. B <= 256 and a multiple of 4. Any strides: the
caller may pass column-major (transposed) outputs, which makes every per-column store coalesced.

Rows are independent given u, so a program owns a tile of BR rows x B columns in registers and
walks the columns in order; a column is read out of the tile with a masked row sum. Ties in the
2:4 choice go to the lower index (the torch reference's topk may break them otherwise), and
rounding ties may differ from torch in the last ulp: compare codes allowing rare mismatches.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deltahub.errors import ShapeMismatchError

from ._common import check_device, next_pow2

MAX_BLOCK = 256


@triton.jit
def _column(w, cols, j):
    """Column j of the register tile w [BR, BLOCK] -> [BR]."""
    return tl.sum(tl.where(cols[None, :] == j, w, 0.0), axis=1)


@triton.jit
def _step(w, cols, j, kept, scale, safe, u_ptr, su0, su1, width, c_ptrs, sc1, k_ptrs, sk1, e_ptrs, se1,
          rmask, ZP: tl.constexpr, QMAX: tl.constexpr, SPARSE: tl.constexpr):
    """Quantize column j of the tile, store its code (and keep flag) and error, update the tile."""
    x = _column(w, cols, j)
    d = tl.load(u_ptr + j * su0 + j * su1)
    c = tl.floor(tl.math.div_rn(x, safe) + ZP + 0.5)
    c = tl.minimum(tl.maximum(c, 0.0), QMAX)
    q = scale * (c - ZP)
    if SPARSE:
        q = tl.where(kept, q, 0.0)
        tl.store(k_ptrs + j * sk1, kept.to(tl.uint8), mask=rmask)
    e = tl.math.div_rn(x - q, d)
    urow = tl.load(u_ptr + j * su0 + cols * su1, mask=(cols >= j) & (cols < width), other=0.0)
    tl.store(c_ptrs + j * sc1, c.to(tl.uint8), mask=rmask)
    tl.store(e_ptrs + j * se1, e, mask=rmask)
    return w - e[:, None] * urow[None, :]


@triton.jit
def _obs_block_kernel(w_ptr, u_ptr, s_ptr, c_ptr, k_ptr, e_ptr, n_rows, width,
                      sw0, sw1, su0, su1, ss0, sc0, sc1, sk0, sk1, se0, se1,
                      ZP: tl.constexpr, QMAX: tl.constexpr, SPARSE: tl.constexpr, FIXED: tl.constexpr,
                      BR: tl.constexpr, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rmask = rows < n_rows
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK)
    w = tl.load(w_ptr + rows64[:, None] * sw0 + cols[None, :] * sw1,
                mask=rmask[:, None] & (cols < width)[None, :], other=0.0)
    scale = tl.load(s_ptr + rows64 * ss0, mask=rmask, other=0.0)
    safe = tl.where(scale == 0.0, 1.0, scale)
    c_ptrs = c_ptr + rows64 * sc0
    k_ptrs = k_ptr + rows64 * sk0
    e_ptrs = e_ptr + rows64 * se0
    for g in range(0, width // 4):
        j = g * 4
        k0 = rmask
        k1 = rmask
        k2 = rmask
        k3 = rmask
        if SPARSE and FIXED:  # the caller's mask
            k0 = tl.load(k_ptrs + j * sk1, mask=rmask, other=0) != 0
            k1 = tl.load(k_ptrs + (j + 1) * sk1, mask=rmask, other=0) != 0
            k2 = tl.load(k_ptrs + (j + 2) * sk1, mask=rmask, other=0) != 0
            k3 = tl.load(k_ptrs + (j + 3) * sk1, mask=rmask, other=0) != 0
        elif SPARSE:  # OBS saliency w² / U_jj² of the group's 4 columns; keep the 2 largest
            d0 = tl.load(u_ptr + j * su0 + j * su1)
            d1 = tl.load(u_ptr + (j + 1) * su0 + (j + 1) * su1)
            d2 = tl.load(u_ptr + (j + 2) * su0 + (j + 2) * su1)
            d3 = tl.load(u_ptr + (j + 3) * su0 + (j + 3) * su1)
            x0 = _column(w, cols, j)
            x1 = _column(w, cols, j + 1)
            x2 = _column(w, cols, j + 2)
            x3 = _column(w, cols, j + 3)
            s0 = (x0 * x0) / (d0 * d0)
            s1 = (x1 * x1) / (d1 * d1)
            s2 = (x2 * x2) / (d2 * d2)
            s3 = (x3 * x3) / (d3 * d3)
            # rank = how many beat it (a tie goes to the lower index); keep rank < 2
            k0 = ((s1 > s0).to(tl.int32) + (s2 > s0).to(tl.int32) + (s3 > s0).to(tl.int32)) < 2
            k1 = ((s0 >= s1).to(tl.int32) + (s2 > s1).to(tl.int32) + (s3 > s1).to(tl.int32)) < 2
            k2 = ((s0 >= s2).to(tl.int32) + (s1 >= s2).to(tl.int32) + (s3 > s2).to(tl.int32)) < 2
            k3 = ((s0 >= s3).to(tl.int32) + (s1 >= s3).to(tl.int32) + (s2 >= s3).to(tl.int32)) < 2
        w = _step(w, cols, j, k0, scale, safe, u_ptr, su0, su1, width, c_ptrs, sc1, k_ptrs, sk1, e_ptrs, se1,
                  rmask, ZP, QMAX, SPARSE)
        w = _step(w, cols, j + 1, k1, scale, safe, u_ptr, su0, su1, width, c_ptrs, sc1, k_ptrs, sk1, e_ptrs,
                  se1, rmask, ZP, QMAX, SPARSE)
        w = _step(w, cols, j + 2, k2, scale, safe, u_ptr, su0, su1, width, c_ptrs, sc1, k_ptrs, sk1, e_ptrs,
                  se1, rmask, ZP, QMAX, SPARSE)
        w = _step(w, cols, j + 3, k3, scale, safe, u_ptr, su0, su1, width, c_ptrs, sc1, k_ptrs, sk1, e_ptrs,
                  se1, rmask, ZP, QMAX, SPARSE)


def _check(w, u, scale, bits, sparse, codes, keep, err) -> None:
    if w.dim() != 2 or w.dtype != torch.float32:
        raise ShapeMismatchError(f"w must be a 2-D float32 [n, B], got {w.dtype} {tuple(w.shape)}")
    n, b = w.shape
    if b % 4 or not 4 <= b <= MAX_BLOCK:
        raise ShapeMismatchError(f"block width must be a multiple of 4 in [4, {MAX_BLOCK}], got {b}")
    if u.dtype != torch.float32 or tuple(u.shape) != (b, b):
        raise ShapeMismatchError(f"u must be float32 [{b}, {b}], got {u.dtype} {tuple(u.shape)}")
    if scale.dtype != torch.float32 or tuple(scale.shape) != (n,):
        raise ShapeMismatchError(f"scale must be float32 [{n}], got {scale.dtype} {tuple(scale.shape)}")
    if bits not in (1, 2, 3, 4, 8):
        raise ShapeMismatchError(f"bits must be 1, 2, 3, 4 or 8, got {bits}")
    outs = (("codes", codes, torch.uint8), ("keep", keep, torch.bool), ("err", err, torch.float32))
    for name, t, dtype in outs:
        if t is not None and (t.dtype != dtype or tuple(t.shape) != (n, b)):
            raise ShapeMismatchError(f"{name} must be {dtype} [{n}, {b}], got {t.dtype} {tuple(t.shape)}")
    if sparse and keep is None:
        raise ShapeMismatchError("keep is needed with sparse=True")
    check_device(*(t for t in (w, u, scale, codes, keep, err) if t is not None))


def _rows_per_program(n: int, device: torch.device) -> int:
    """Rows per program: 32, halved (down to 8) until there are ~2 programs per multiprocessor."""
    if device.type != "cuda":
        return max(8, min(64, next_pow2(n)))  # the interpreter's cost grows with the programs
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    br = 32
    while br > 8 and triton.cdiv(n, br) < 2 * sms:
        br //= 2
    return br


def obs_block(w: torch.Tensor, u: torch.Tensor, scale: torch.Tensor, *, bits: int, sparse: bool,
              codes: torch.Tensor | None = None, keep: torch.Tensor | None = None,
              err: torch.Tensor | None = None, fixed_mask: bool = False):
    """Run one block (see the module docstring) -> (codes, keep or None, err); outputs are
    allocated (row-major) when not given. ``w`` is not modified; with ``fixed_mask`` (sparse
    only) ``keep`` holds the 2:4 mask to use, given by the caller (stored back unchanged)."""
    n, b = w.shape if w.dim() == 2 else (0, 0)
    dev = w.device
    if codes is None:
        codes = torch.empty(n, b, dtype=torch.uint8, device=dev)
    if fixed_mask and (not sparse or keep is None):
        raise ShapeMismatchError("fixed_mask needs sparse=True and the mask in keep")
    if sparse and keep is None:
        keep = torch.empty(n, b, dtype=torch.bool, device=dev)
    if err is None:
        err = torch.empty(n, b, dtype=torch.float32, device=dev)
    _check(w, u, scale, bits, sparse, codes, keep, err)
    if n == 0:
        return codes, (keep if sparse else None), err
    k8 = keep.view(torch.uint8) if sparse else codes  # unused pointer when dense
    br = _rows_per_program(n, dev)
    grid = (triton.cdiv(n, br),)
    _obs_block_kernel[grid](
        w, u, scale, codes, k8, err, n, b,
        w.stride(0), w.stride(1), u.stride(0), u.stride(1), scale.stride(0),
        codes.stride(0), codes.stride(1), k8.stride(0), k8.stride(1), err.stride(0), err.stride(1),
        ZP=(2**bits - 1) / 2, QMAX=float(2**bits - 1), SPARSE=sparse, FIXED=fixed_mask, BR=br,
        BLOCK=max(4, next_pow2(b)),
        num_warps=4,
    )
    return codes, (keep if sparse else None), err


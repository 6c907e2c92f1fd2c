"""Attention over the paged KV cache: decodes through ``kernels.paged_decode_attention`` (one Triton
launch on CUDA fp16/bf16, the float32 reference elsewhere), prefills through torch's SDPA.

Batch layout (see BatchContext): the first ``num_decodes`` tokens are decodes (one per sequence,
attending to their sequence's cached context); the rest are whole prefills, each attending
causally to its own tokens. Every token's K/V is first written to the cache at ``slot_mapping``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from deltahub.server.models.slot_share import SlotShare

from deltahub import kernels


@dataclass
class BatchContext:
    """Per-step tensors (on the model's device) and host-side layout of one forward.

    positions [T] long; slot_mapping [T] long (cache slot of each token); slot_idx [T] long (the
    token's variant slot, S for base-only); block_tables [D, max_blocks] int32 and context_lens
    [D] long for the D decodes; prefill_spans: host list of (start, end) into the token dim;
    logits_indices [B] long: rows whose logits are sampled; share: what the step's delta layers
    share (``slot_share.SlotShare``; None: each layer makes its own).
    """

    positions: torch.Tensor
    slot_mapping: torch.Tensor
    slot_idx: torch.Tensor
    num_decodes: int
    block_tables: torch.Tensor | None
    context_lens: torch.Tensor | None
    prefill_spans: list[tuple[int, int]]
    logits_indices: torch.Tensor
    share: SlotShare | None = None


def write_kv(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] -> caches [num_blocks, block_size, Hkv, D] at flat slots ``slot_mapping``."""
    hkv, d = k.shape[1], k.shape[2]
    k_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, hkv, d).index_copy_(0, slot_mapping, v)


def prefill_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None
) -> torch.Tensor:
    """Causal attention of one sequence over its own tokens: q [L, H, Dh], k/v [L, Hkv, Dh]."""
    n = q.shape[0]
    qt, kt, vt = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
    if window is not None and n > window:
        i = torch.arange(n, device=q.device)
        allowed = (i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - window)
        out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=allowed, scale=scale, enable_gqa=True)
    else:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale, enable_gqa=True)
    return out.transpose(0, 1)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    ctx: BatchContext,
    scale: float,
    window: int | None = None,
) -> torch.Tensor:
    """q [T, H, Dh], k/v [T, Hkv, Dh] of the step's tokens -> [T, H, Dh]; writes k/v to the cache."""
    write_kv(k, v, k_cache, v_cache, ctx.slot_mapping)
    nd = ctx.num_decodes
    parts = []
    if nd:
        assert ctx.block_tables is not None and ctx.context_lens is not None
        parts.append(
            kernels.paged_decode_attention(
                q[:nd], k_cache, v_cache, ctx.block_tables, ctx.context_lens, scale, window
            )
        )
    for s, e in ctx.prefill_spans:
        parts.append(prefill_attention(q[s:e], k[s:e], v[s:e], scale, window))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

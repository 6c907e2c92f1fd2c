"""Compact LlamaForCausalLM / MistralForCausalLM / Qwen2ForCausalLM for serving with deltas.

Built from the Hugging Face config; parameter names equal transformers' (``model.layers.0.
self_attn.q_proj.weight`` ...), so base safetensors and delta tensor names map one to one.
Covers biases (Qwen2 q/k/v, Llama ``attention_bias`` / ``mlp_bias``), GQA, ``head_dim``, RoPE
scaling (every type transformers knows, at its initial frequencies), tied embeddings and
Mistral's sliding window. Tokens of all sequences are flattened into one dimension [T].
"""

from __future__ import annotations

import torch
from deltahub.server.models.attention import BatchContext, paged_attention
from deltahub.server.models.delta_linear import DeltaEmbedding, DeltaLinear, DeltaRMSNorm
from deltahub.server.models.slot_share import SlotShare
from torch import nn

from deltahub import kernels
from deltahub.errors import ModelSourceError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


def rope_parameters(config) -> dict:
    """The config's RoPE settings in transformers 5 form ({"rope_type", "rope_theta", ...})."""
    rp = getattr(config, "rope_parameters", None)
    if isinstance(rp, dict) and "rope_theta" in rp:
        return {"rope_type": rp.get("rope_type", rp.get("type", "default")), **rp}
    scaling = dict(getattr(config, "rope_scaling", None) or {})
    scaling.setdefault("rope_type", scaling.get("type", "default"))
    scaling["rope_theta"] = getattr(config, "rope_theta", 10000.0)
    return scaling


def rope_tables(config, head_dim: int, max_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_positions, head_dim] float32, as transformers' rotary embedding computes them."""
    rp = rope_parameters(config)
    rope_type = rp["rope_type"]
    if rope_type == "default":
        inv_freq = 1.0 / (
            rp["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
        )
        scaling = 1.0
    else:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        if rope_type not in ROPE_INIT_FUNCTIONS:
            raise ModelSourceError(f"RoPE type {rope_type!r} is not supported")
        inv_freq, scaling = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    pos = torch.arange(max_positions, dtype=torch.float32)
    freqs = pos[:, None] * inv_freq.float()[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scaling, emb.sin() * scaling


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg, layer: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads = cfg.num_attention_heads
        self.num_kv_heads = getattr(cfg, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.num_heads
        self.scale = self.head_dim**-0.5
        qkv_bias = cfg.model_type == "qwen2" or bool(getattr(cfg, "attention_bias", False))
        o_bias = cfg.model_type != "qwen2" and bool(getattr(cfg, "attention_bias", False))
        h = cfg.hidden_size
        mk = lambda i, o, b: DeltaLinear(i, o, b, num_slots, dtype, device)  # noqa: E731
        self.q_proj = mk(h, self.num_heads * self.head_dim, qkv_bias)
        self.k_proj = mk(h, self.num_kv_heads * self.head_dim, qkv_bias)
        self.v_proj = mk(h, self.num_kv_heads * self.head_dim, qkv_bias)
        self.o_proj = mk(self.num_heads * self.head_dim, h, o_bias)
        window = getattr(cfg, "sliding_window", None)
        if cfg.model_type == "qwen2" and not getattr(cfg, "use_sliding_window", False):
            window = None
        self.window = int(window) if window else None

    def forward(
        self,
        x: torch.Tensor,
        ctx: BatchContext,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        t = x.shape[0]
        q = self.q_proj(x, ctx.slot_idx, ctx.share).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x, ctx.slot_idx, ctx.share).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x, ctx.slot_idx, ctx.share).view(t, self.num_kv_heads, self.head_dim)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        o = paged_attention(q, k, v, kv[0], kv[1], ctx, self.scale, self.window)
        return self.o_proj(o.reshape(t, -1), ctx.slot_idx, ctx.share)


class MLP(nn.Module):
    def __init__(self, cfg, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        h, i = cfg.hidden_size, cfg.intermediate_size
        bias = bool(getattr(cfg, "mlp_bias", False))
        self.gate_proj = DeltaLinear(h, i, bias, num_slots, dtype, device)
        self.up_proj = DeltaLinear(h, i, bias, num_slots, dtype, device)
        self.down_proj = DeltaLinear(i, h, bias, num_slots, dtype, device)
        act = getattr(cfg, "hidden_act", "silu")
        acts = {"silu": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh"}  # -> kernels.act_mul's
        if act not in acts:
            raise ModelSourceError(f"activation {act!r} is not supported")
        self.act = acts[act]

    def forward(
        self, x: torch.Tensor, slot_idx: torch.Tensor, share: SlotShare | None = None
    ) -> torch.Tensor:
        g, u = self.gate_proj(x, slot_idx, share), self.up_proj(x, slot_idx, share)
        h, hp = kernels.act_mul(g, u, self.act, permute=share is not None and share.wants_permuted(g))
        if share is not None and hp is not None:
            share.offer(h, h.shape[1], hp)
        return self.down_proj(h, slot_idx, share)


class DecoderLayer(nn.Module):
    def __init__(self, cfg, layer: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        eps = cfg.rms_norm_eps
        self.input_layernorm = DeltaRMSNorm(cfg.hidden_size, eps, num_slots, dtype, device)
        self.self_attn = Attention(cfg, layer, num_slots, dtype, device)
        self.post_attention_layernorm = DeltaRMSNorm(cfg.hidden_size, eps, num_slots, dtype, device)
        self.mlp = MLP(cfg, num_slots, dtype, device)

    def forward(self, x, ctx, cos, sin, kv):
        x = x + self.self_attn(self.input_layernorm(x, ctx.slot_idx, ctx.share), ctx, cos, sin, kv)
        h = self.post_attention_layernorm(x, ctx.slot_idx, ctx.share)
        return x + self.mlp(h, ctx.slot_idx, ctx.share)


class Backbone(nn.Module):
    def __init__(self, cfg, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.embed_tokens = DeltaEmbedding(cfg.vocab_size, cfg.hidden_size, num_slots, dtype, device)
        self.layers = nn.ModuleList(
            DecoderLayer(cfg, i, num_slots, dtype, device) for i in range(cfg.num_hidden_layers)
        )
        self.norm = DeltaRMSNorm(cfg.hidden_size, cfg.rms_norm_eps, num_slots, dtype, device)


class CausalLM(nn.Module):
    """The whole model. ``forward`` -> hidden states [T, H]; ``logits`` of chosen rows -> [B, V]."""

    def __init__(
        self, cfg, *, num_slots: int, dtype: torch.dtype, device: torch.device, max_positions: int
    ) -> None:
        super().__init__()
        archs = list(getattr(cfg, "architectures", None) or [])
        if archs and archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ModelSourceError(
                f"architecture {archs[0]} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        self.config = cfg
        self.dtype = dtype
        self.tied = bool(getattr(cfg, "tie_word_embeddings", False))
        self.model = Backbone(cfg, num_slots, dtype, device)
        self.lm_head = DeltaLinear(cfg.hidden_size, cfg.vocab_size, False, num_slots, dtype, device)
        if self.tied:
            self.lm_head.weight = self.model.embed_tokens.weight
        for m in (self.model.embed_tokens, self.lm_head):  # fine-tunes may add vocabulary rows
            m.pools()["weight"].vocab_rows = True  # type: ignore[union-attr]
        head_dim = self.model.layers[0].self_attn.head_dim
        cos, sin = rope_tables(cfg, head_dim, max_positions)
        self.register_buffer("cos", cos.to(device=device, dtype=dtype), persistent=False)
        self.register_buffer("sin", sin.to(device=device, dtype=dtype), persistent=False)

    def forward(
        self, input_ids: torch.Tensor, ctx: BatchContext, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]
    ) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids, ctx.slot_idx)
        cos = self.cos[ctx.positions].unsqueeze(1)
        sin = self.sin[ctx.positions].unsqueeze(1)
        for layer, kv in zip(self.model.layers, kv_caches, strict=True):
            x = layer(x, ctx, cos, sin, kv)
        return self.model.norm(x, ctx.slot_idx)

    def logits(self, hidden: torch.Tensor, slot_idx: torch.Tensor) -> torch.Tensor:
        """hidden [B, H] with their slot_idx [B] -> float32 logits [B, V]."""
        return self.lm_head(hidden, slot_idx).float()

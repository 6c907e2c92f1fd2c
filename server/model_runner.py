"""The only owner of devices: base weights, the per-slot delta pools, the KV cache, batch tensors.

``run(batch)`` turns a ScheduledBatch into tensors, runs the model and samples. Decode inputs are
laid out first so their shapes depend only on the number of decodes (CUDA-graph friendly), and
nothing in the forward reads values back to the host; the sampled tokens are the step's one sync.
Slot loads (``to_slot``) copy pinned host parts on a side CUDA stream and return an event, so a
variant becomes usable when its copy has landed without stalling running batches.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from deltahub.server.config import EngineConfig
from deltahub.server.errors import EngineConfigError
from deltahub.server.models.attention import BatchContext
from deltahub.server.models.delta_linear import DeltaModule, _Pools
from deltahub.server.models.llama import CausalLM
from deltahub.server.models.slot_share import SlotShare
from deltahub.server.models.weights import load_weights, read_config
from deltahub.server.sampling import SampleResult, sample
from deltahub.server.scheduler import ScheduledBatch
from deltahub.server.sequence import Sequence
from deltahub.server.variants import BaseInfo, HostDelta

log = logging.getLogger(__name__)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelRunner:
    def __init__(self, config: EngineConfig, base_folder: str | Path, base_id: str | None = None) -> None:
        self.config = config
        self.device = torch.device(config.device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise EngineConfigError("device 'cuda' was asked for, but no CUDA GPU is available")
        name = config.torch_dtype_name
        if name not in DTYPES:
            raise EngineConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {name!r}")
        self.dtype = DTYPES[name]
        self.hf_config = read_config(base_folder)
        cfg = self.hf_config
        model_max = int(getattr(cfg, "max_position_embeddings", 4096) or 4096)
        self.max_model_len = min(config.max_model_len or min(model_max, 4096), model_max)
        self.num_slots = config.max_gpu_variants
        with torch.device(self.device):
            self.model = CausalLM(
                cfg,
                num_slots=self.num_slots,
                dtype=self.dtype,
                device=self.device,
                max_positions=self.max_model_len,
            )
        load_weights(self.model, base_folder)
        self.model.eval()
        self.delta_modules = [(n, m) for n, m in self.model.named_modules() if isinstance(m, DeltaModule)]
        if self.device.type == "cpu" and config.cpu_dequantize_deltas:
            for _, m in self.delta_modules:
                for pool in m.pools().values():
                    if isinstance(pool, _Pools):
                        pool.dequantize = True
        self.base_info = BaseInfo(
            base_id or str(base_folder),
            {n: tuple(p.shape) for n, p in self.model.named_parameters(remove_duplicate=False)},
            self.model.tied,
        )
        self._alloc_kv_cache()
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.generator = torch.Generator(self.device).manual_seed(config.seed)

    # -- KV cache ---------------------------------------------------------------------------------
    def _alloc_kv_cache(self) -> None:
        cfg, c = self.hf_config, self.config
        attn = self.model.model.layers[0].self_attn
        per_block = 2 * len(self.model.model.layers) * c.block_size * attn.num_kv_heads * attn.head_dim
        per_block *= torch.tensor([], dtype=self.dtype).element_size()
        n = c.num_kv_blocks
        if n is None and self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            n = int(free * c.gpu_memory_utilization) // per_block
        if n is None:
            n = c.max_num_seqs * ((self.max_model_len + c.block_size - 1) // c.block_size)
        if n < 1:
            raise EngineConfigError("no memory left for the KV cache")
        self.num_kv_blocks = n
        shape = (len(self.model.model.layers), 2, n, c.block_size, attn.num_kv_heads, attn.head_dim)
        self.kv_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
        self.kv = [(self.kv_cache[i, 0], self.kv_cache[i, 1]) for i in range(shape[0])]
        log.info("KV cache: %d blocks of %d tokens (%.1f MiB)", n, c.block_size, n * per_block / 2**20)
        del cfg

    # -- variant slots ------------------------------------------------------------------------------
    def _module_deltas(self, host: HostDelta):
        for mname, module in self.delta_modules:
            prefix = f"{mname}." if mname else ""
            yield (
                mname,
                module,
                {p: host.tensors[prefix + p] for p in module.delta_params if prefix + p in host.tensors},
            )

    def to_slot(self, slot: int, host: HostDelta):
        """Start writing ``host``'s deltas into ``slot``; returns a ticket for ``slot_ready``."""
        items = list(self._module_deltas(host))
        for mname, module, deltas in items:  # allocation on the main stream
            module.prepare(deltas, mname)
        if self.copy_stream is None:
            for _, module, deltas in items:
                module.write_slot(slot, deltas)
            return None
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            for _, module, deltas in items:
                module.write_slot(slot, deltas)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return event

    def slot_ready(self, ticket) -> bool:
        if ticket is None or ticket.query():
            if ticket is not None:
                torch.cuda.current_stream(self.device).wait_event(ticket)
            return True
        return False

    def clear_slot(self, slot: int) -> None:
        for _, module in self.delta_modules:
            module.clear_slot(slot)

    # -- a step -----------------------------------------------------------------------------------
    def _prepare(self, batch: ScheduledBatch, slots: dict[int, int]) -> tuple[torch.Tensor, BatchContext]:
        bs, s_base = self.config.block_size, self.num_slots
        ids: list[int] = []
        pos: list[int] = []
        smap: list[int] = []
        sidx: list[int] = []
        logit_rows: list[int] = []
        for seq in batch.decodes:
            p = len(seq) - 1
            ids.append(seq.last_token_id)
            pos.append(p)
            smap.append(seq.block_table[p // bs] * bs + p % bs)
            sidx.append(slots.get(seq.seq_id, s_base))
            logit_rows.append(len(ids) - 1)
        spans = []
        for seq in batch.prefills:
            n = len(seq)
            start = len(ids)
            ids.extend(seq.all_token_ids)
            pos.extend(range(n))
            smap.extend(seq.block_table[p // bs] * bs + p % bs for p in range(n))
            sidx.extend([slots.get(seq.seq_id, s_base)] * n)
            spans.append((start, start + n))
            logit_rows.append(len(ids) - 1)
        dev = self.device
        as_t = lambda v, dt=torch.long: torch.tensor(v, dtype=dt).to(dev, non_blocking=True)  # noqa: E731
        block_tables = context_lens = None
        if batch.decodes:
            width = max(len(s.block_table) for s in batch.decodes)
            block_tables = as_t(
                [s.block_table + [0] * (width - len(s.block_table)) for s in batch.decodes], torch.int32
            )
            context_lens = as_t([len(s) for s in batch.decodes])
        ctx = BatchContext(
            positions=as_t(pos),
            slot_mapping=as_t(smap),
            slot_idx=as_t(sidx),
            num_decodes=len(batch.decodes),
            block_tables=block_tables,
            context_lens=context_lens,
            prefill_spans=spans,
            logits_indices=as_t(logit_rows),
            share=SlotShare(used=frozenset(sidx) - {s_base}),
        )
        return as_t(ids), ctx

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, slots: dict[int, int]) -> list[SampleResult]:
        """One forward over ``batch``; ``slots`` {seq_id: variant slot} (absent = base).
        Returns one SampleResult per sequence, decodes first then prefills."""
        input_ids, ctx = self._prepare(batch, slots)
        hidden = self.model(input_ids, ctx, self.kv)
        rows = ctx.logits_indices
        logits = self.model.logits(hidden[rows], ctx.slot_idx[rows])
        seqs = batch.seqs
        for seq in seqs:
            if seq.generator is None and seq.params.seed is not None and not seq.params.greedy:
                seq.generator = torch.Generator(self.device).manual_seed(seq.params.seed)
        for seq, (s, e) in zip(batch.prefills, ctx.prefill_spans, strict=True):
            if seq.params.prompt_logprobs and seq.prompt_logprobs is None:
                seq.prompt_logprobs = self._prompt_logprobs(hidden[s:e], ctx.slot_idx[s:e], seq)
        return sample(logits, seqs, self.generator)

    def _prompt_logprobs(
        self, hidden: torch.Tensor, slot_idx: torch.Tensor, seq: Sequence
    ) -> list[float | None]:
        n = len(seq.prompt_token_ids)
        if n < 2:
            return [None] * n
        lp = torch.log_softmax(self.model.logits(hidden[: n - 1], slot_idx[: n - 1]), dim=-1)
        nxt = torch.tensor(seq.prompt_token_ids[1:], device=lp.device).unsqueeze(1)
        return [None, *lp.gather(1, nxt).squeeze(1).tolist()]

"""The engine: ``step() = schedule -> run -> postprocess``, plus request intake and variant admin.
Single-threaded: AsyncLLM drives it from its loop thread, LLM from the caller's thread."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from deltahub.server.block_manager import BlockManager
from deltahub.server.config import EngineConfig
from deltahub.server.delta_cache import DeltaCache, VariantInfo
from deltahub.server.errors import (
    EngineOverloadedError,
    RequestValidationError,
    UnknownVariantError,
    VariantLoadError,
)
from deltahub.server.sampling import SampleResult, SamplingParams
from deltahub.server.scheduler import Scheduler
from deltahub.server.sequence import (
    FINISH_ABORT,
    FINISH_EOS,
    FINISH_ERROR,
    FINISH_LENGTH,
    FINISH_STOP,
    RequestOutput,
    Sequence,
)

log = logging.getLogger(__name__)


class _Detokenizer:
    """Incremental decoding: emits text only once it no longer ends in a partial character."""

    def __init__(self, tokenizer, skip_special: bool) -> None:
        self.tok, self.skip = tokenizer, skip_special
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        dec = lambda a, b=None: self.tok.decode(self.ids[a:b], skip_special_tokens=self.skip)  # noqa: E731
        before, now = dec(self.prefix, self.read), dec(self.prefix)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""


class _Backend:
    """DeltaCache's backend: loads on loader threads, slot copies through the model runner."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load_host(self, name: str, ref: str, kind: str | None):
        from deltahub.server.variants import load_variant

        e = self.engine
        return load_variant(
            name,
            ref,
            kind,
            base=e.runner.base_info,
            token=e.config.token,
            pin=e.runner.device.type == "cuda",
            check_fingerprint=e.config.check_base_fingerprint,
        )

    def to_slot(self, slot, host):
        return self.engine.runner.to_slot(slot, host)

    def slot_ready(self, ticket) -> bool:
        return self.engine.runner.slot_ready(ticket)

    def clear_slot(self, slot: int) -> None:
        self.engine.runner.clear_slot(slot)


class Engine:
    """A base model (folder or Hub id) serving ``variants`` {name: ref} under ``config``."""

    def __init__(
        self, base: str, variants: dict[str, str] | None = None, config: EngineConfig | None = None
    ) -> None:
        from deltahub.server.model_runner import ModelRunner

        from deltahub.sources import resolve_model

        self.config = config = config or EngineConfig()
        resolved = resolve_model(base, token=config.token, kind="model")
        self.base_id = str(base)
        self.base_folder = Path(resolved.path)
        self.runner = ModelRunner(config, self.base_folder, self.base_id)
        self.runner.base_info.fingerprint = self._base_fingerprint
        self._fingerprint: str | None = None
        self._fp_lock = threading.Lock()
        self.max_model_len = self.runner.max_model_len
        self.blocks = BlockManager(self.runner.num_kv_blocks, config.block_size)
        self.cache = DeltaCache(
            _Backend(self),
            num_slots=config.max_gpu_variants,
            max_host=config.max_host_variants,
            max_gpu_bytes=config.max_gpu_variant_bytes,
            loader_threads=config.loader_threads,
        )
        self.scheduler = Scheduler(
            config, self.blocks, self.cache.is_ready, self.cache.acquire, self.cache.release
        )
        self._tokenizers: dict[str, Any] = {}
        self._tok_lock = threading.Lock()
        self.requests: dict[str, Sequence] = {}
        self.counters = {
            "steps": 0,
            "prefill_tokens": 0,
            "decode_tokens": 0,
            "preemptions": 0,
            "requests_finished": 0,
            "requests_failed": 0,
            "batch_size": 0,
            "batch_tokens": 0,
        }
        self.base_counters = {"requests": 0, "generated_tokens": 0}
        for name, ref in (variants or {}).items():
            self.add_variant(name, ref)

    # -- variants ---------------------------------------------------------------------------------
    def _base_fingerprint(self) -> str | None:
        with self._fp_lock:
            if self._fingerprint is None:
                from deltahub.fingerprint import fingerprint

                self._fingerprint = fingerprint(self.base_folder)
            return self._fingerprint

    def add_variant(self, name: str, ref: str, kind: str | None = None) -> None:
        if not name or name == self.base_id:
            raise VariantLoadError(f"invalid variant name {name!r}")
        if kind not in (None, "delta", "lora"):
            raise VariantLoadError(f"variant kind must be 'delta' or 'lora', got {kind!r}")
        self.cache.register(name, ref, kind)

    def preload(self, name: str) -> None:
        """Start loading ``name`` into host memory now (and into a free slot if there is one)."""
        self.cache.prefetch([name])

    def remove_variant(self, name: str) -> None:
        self.cache.remove(name)
        for seq in [s for s in self.scheduler.waiting if s.variant == name]:
            self._fail(seq, UnknownVariantError(f"variant {name!r} was removed"))

    def variants(self) -> list[VariantInfo]:
        return self.cache.infos()

    def tokenizer(self, variant: str | None = None):
        """The variant's tokenizer (its own folder's if it ships one, else the base's)."""
        folder = self.base_folder
        entry = self.cache.entries.get(variant) if variant is not None else None  # any thread may ask
        if entry is not None:
            host, ref = entry.host, Path(entry.ref)
            if host is not None and host.has_tokenizer:
                folder = host.folder
            elif ref.is_dir() and any(
                (ref / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")
            ):
                folder = ref
        key = str(folder)
        with self._tok_lock:
            if key not in self._tokenizers:
                from transformers import AutoTokenizer

                self._tokenizers[key] = AutoTokenizer.from_pretrained(key)
            return self._tokenizers[key]

    def _eos_ids(self, variant: str | None) -> set[int]:
        tok = self.tokenizer(variant)
        ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
        gen = getattr(self.runner.hf_config, "eos_token_id", None)
        host = self.cache.host_object(variant) if variant is not None and variant in self.cache else None
        if host is not None and host.eos_token_ids:
            gen = host.eos_token_ids
        ids |= set([gen] if isinstance(gen, int) else (gen or []))
        return ids

    def resolve_variant(self, variant: str | None) -> str | None:
        """Map a request's variant to a registered name (None = the base); may register it when
        dynamic loading is on."""
        if variant in (None, "", self.base_id):
            return None
        if variant in self.cache:
            return variant
        if self.config.dynamic_loading:
            self.cache.register(variant, variant)
            return variant
        known = ", ".join(sorted(self.cache.names())) or "none"
        raise UnknownVariantError(f"unknown variant {variant!r} (registered: {known})")

    # -- requests ---------------------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt: str | None = None,
        params: SamplingParams | None = None,
        variant: str | None = None,
        prompt_token_ids: list[int] | None = None,
    ) -> Sequence:
        params = params or SamplingParams()
        params.validate()
        if request_id in self.requests:
            raise RequestValidationError(f"request id {request_id!r} is already in use")
        if len(self.scheduler.waiting) >= self.config.max_waiting:
            raise EngineOverloadedError(f"the queue is full ({self.config.max_waiting} waiting requests)")
        name = self.resolve_variant(variant)
        if prompt_token_ids is None:
            if prompt is None:
                raise RequestValidationError("a request needs a prompt or prompt_token_ids")
            prompt_token_ids = self.tokenizer(name)(prompt)["input_ids"]  # BOS etc. as the model expects
        ids = [int(t) for t in prompt_token_ids]
        vocab = max(self.runner.hf_config.vocab_size, len(self.tokenizer(name)))  # + tokens a variant added
        if not ids:
            raise RequestValidationError("the prompt is empty")
        if min(ids) < 0 or max(ids) >= vocab:
            raise RequestValidationError(f"prompt token ids must be in [0, {vocab})")
        if len(ids) + params.max_new_tokens > self.max_model_len:
            raise RequestValidationError(
                f"inputs tokens + max_new_tokens must be <= {self.max_model_len}. Given: {len(ids)} inputs "
                f"tokens and {params.max_new_tokens} max_new_tokens"
            )
        if self.blocks.blocks_for(len(ids) + params.max_new_tokens) > self.blocks.num_blocks:
            raise RequestValidationError("the request does not fit in the KV cache")
        if name is not None:
            self.cache.retry(name)
        seq = Sequence(request_id, ids, params, name)
        seq.detok = _Detokenizer(self.tokenizer(name), params.skip_special_tokens)
        seq.eos_ids = set() if params.ignore_eos else self._eos_ids(name)
        self.requests[request_id] = seq
        self.scheduler.add(seq)
        if name is None:
            self.base_counters["requests"] += 1
        else:
            self.cache.count(name, requests=1)
        return seq

    def abort(self, request_id: str) -> RequestOutput | None:
        seq = self.requests.get(request_id)
        if seq is None or seq.is_finished:
            return None
        self._finish(seq, FINISH_ABORT)
        return self._output(seq)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work()

    def _finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        self.scheduler.finish(seq)
        seq.finish(
            reason,
            error=None if error is None else str(error),
            error_type=None if error is None else type(error).__name__,
        )
        self.requests.pop(seq.request_id, None)
        self.counters["requests_failed" if error else "requests_finished"] += 1

    def _fail(self, seq: Sequence, error: Exception) -> None:
        self._finish(seq, FINISH_ERROR, error)

    # -- the step ---------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Advance loads, schedule one batch, run it, and return the outputs that changed."""
        outputs: list[RequestOutput] = []
        for name, err in self.cache.poll():
            for seq in [s for s in self.scheduler.waiting if s.variant == name]:
                self._fail(seq, VariantLoadError(f"variant {name!r} failed to load: {err}"))
                outputs.append(self._output(seq))
        self.cache.prefetch(self.scheduler.wanted_variants())
        batch = self.scheduler.schedule()
        self.counters["preemptions"] += len(batch.preempted)
        if not batch:
            return outputs
        seqs = batch.seqs
        slots = {s.seq_id: self.cache.slot_of(s.variant) for s in seqs if s.variant is not None}
        results = self.runner.run(batch, slots)
        c = self.counters
        c["steps"] += 1
        c["batch_size"], c["batch_tokens"] = len(seqs), batch.num_tokens
        c["prefill_tokens"] += batch.num_tokens - len(batch.decodes)
        c["decode_tokens"] += len(batch.decodes)
        for seq in batch.prefills:
            seq.num_cached_tokens = len(seq)
        for seq, res in zip(seqs, results, strict=True):
            self._postprocess(seq, res)
            outputs.append(self._output(seq))
        return outputs

    def _postprocess(self, seq: Sequence, res: SampleResult) -> None:
        now = time.monotonic()
        if seq.first_token_time is None:
            seq.first_token_time = now
        seq.output_token_ids.append(res.token_id)
        seq.num_cached_tokens = len(seq) - 1
        if res.logprob is not None:
            seq.logprobs.append(res.logprob)
        if res.top is not None:
            seq.top_logprobs.append(res.top)
        if seq.variant is None:
            self.base_counters["generated_tokens"] += 1
        else:
            self.cache.count(seq.variant, tokens=1)
        p = seq.params
        new = seq.detok.push(res.token_id)
        if new:
            start = max(0, len(seq.text) - max((len(s) for s in p.stop), default=0))
            seq.text += new
            for stop in p.stop:
                i = seq.text.find(stop, start)
                if i >= 0:
                    seq.text = seq.text[: i + len(stop)] if p.include_stop_str_in_output else seq.text[:i]
                    self._finish(seq, FINISH_STOP)
                    return
        if res.token_id in seq.eos_ids:
            self._finish(seq, FINISH_EOS)
        elif res.token_id in p.stop_token_ids:
            self._finish(seq, FINISH_STOP)
        elif len(seq.output_token_ids) >= p.max_new_tokens or len(seq) >= self.max_model_len:
            self._finish(seq, FINISH_LENGTH)

    def _output(self, seq: Sequence) -> RequestOutput:
        """The request's state, with what is new since the last output of it."""
        now = seq.finished_time or time.monotonic()
        sched = seq.first_scheduled_time
        out = RequestOutput(
            request_id=seq.request_id,
            variant=seq.variant,
            prompt_token_ids=seq.prompt_token_ids,
            text=seq.text,
            token_ids=list(seq.output_token_ids),
            new_text=seq.text[seq.sent_text :],
            new_token_ids=seq.output_token_ids[seq.sent_tokens :],
            finished=seq.is_finished,
            finish_reason=seq.finish_reason,
            error=seq.error,
            error_type=seq.error_type,
            logprobs=list(seq.logprobs) if seq.params.logprobs or seq.params.top_logprobs else None,
            top_logprobs=list(seq.top_logprobs) if seq.params.top_logprobs else None,
            prompt_logprobs=seq.prompt_logprobs,
            seed=seq.params.seed,
            queue_time=(sched if sched is not None else now) - seq.arrival_time,
            inference_time=now - sched if sched is not None else 0.0,
            first_token_time=None
            if seq.first_token_time is None
            else seq.first_token_time - seq.arrival_time,
            num_preemptions=seq.num_preemptions,
        )
        if out.logprobs is not None:
            out.new_logprobs = out.logprobs[seq.sent_tokens :]
        if out.top_logprobs is not None:
            out.new_top_logprobs = out.top_logprobs[seq.sent_tokens :]
        seq.sent_tokens, seq.sent_text = len(seq.output_token_ids), len(seq.text)
        return out

    # -- introspection ------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """Counters for metrics: queue, batch, KV blocks, per-variant requests / tokens / loads."""
        b = self.blocks
        return {
            "queue_size": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "kv_blocks_total": b.num_blocks,
            "kv_blocks_used": b.num_used,
            "kv_blocks_free": b.num_free,
            "block_size": b.block_size,
            "gpu_slots": self.cache.num_slots,
            "gpu_slots_used": sum(n is not None for n in self.cache.slots),
            **self.counters,
            "base": dict(self.base_counters),
            "variants": {v.name: asdict(v) for v in self.cache.infos()},
        }

    def info(self) -> dict[str, Any]:
        """Static facts for /info."""
        c = self.config
        return {
            "model_id": self.base_id,
            "model_dtype": str(self.runner.dtype).removeprefix("torch."),
            "model_device_type": self.runner.device.type,
            "max_total_tokens": self.max_model_len,
            "max_input_tokens": self.max_model_len - 1,
            "max_batch_total_tokens": b_tokens(self.blocks),
            "max_concurrent_requests": c.max_waiting + c.max_num_seqs,
            "max_num_seqs": c.max_num_seqs,
            "max_waiting": c.max_waiting,
            "block_size": c.block_size,
            "gpu_slots": c.max_gpu_variants,
            "max_host_variants": c.max_host_variants,
            "dynamic_loading": c.dynamic_loading,
            "vocab_size": self.runner.hf_config.vocab_size,
        }

    def shutdown(self) -> None:
        self.cache.shutdown()


def b_tokens(blocks: BlockManager) -> int:
    return blocks.num_blocks * blocks.block_size

"""The synchronous Python API: ``LLM(base, variants, device).generate(prompts, params, variants)``."""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence as Seq

from deltahub.server.config import EngineConfig
from deltahub.server.delta_cache import VariantInfo
from deltahub.server.engine import Engine
from deltahub.server.sampling import SamplingParams
from deltahub.server.sequence import RequestOutput

_batch_ids = itertools.count()


class LLM:
    """A base model plus named variants {name: folder or Hub id} (deltahub deltas or PEFT LoRA
    adapters). Other keyword arguments are EngineConfig fields (max_gpu_variants, ...)."""

    def __init__(
        self, base: str, variants: dict[str, str] | None = None, device: str = "cpu", **kwargs
    ) -> None:
        self.config = EngineConfig.from_kwargs(device=device, **kwargs)
        self.engine = Engine(str(base), {k: str(v) for k, v in (variants or {}).items()}, self.config)

    def generate(
        self,
        prompts: str | list[str] | list[list[int]],
        params: SamplingParams | list[SamplingParams] | None = None,
        variants: str | Seq[str | None] | None = None,
    ) -> list[RequestOutput]:
        """Run every prompt to completion (continuous batching) and return outputs in order.

        ``prompts``: strings or token-id lists; ``params``: one for all or one per prompt;
        ``variants``: one name for all (None = base) or one per prompt. A request whose variant
        fails to load comes back with ``finish_reason == "error"`` and ``error`` set; the others
        complete normally.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        n = len(prompts)
        plist = params if isinstance(params, list) else [params or SamplingParams()] * n
        vlist = list(variants) if isinstance(variants, (list, tuple)) else [variants] * n
        if len(plist) != n or len(vlist) != n:
            raise ValueError("params and variants must be single values or one per prompt")
        tag = next(_batch_ids)
        ids = [f"llm-{tag}-{i}" for i in range(n)]
        for rid, prompt, p, v in zip(ids, prompts, plist, vlist, strict=True):
            if isinstance(prompt, str):
                self.engine.add_request(rid, prompt, p, v)
            else:
                self.engine.add_request(rid, None, p, v, prompt_token_ids=list(prompt))
        done: dict[str, RequestOutput] = {}
        try:
            while len(done) < n:
                outs = self.engine.step()
                if not outs:
                    time.sleep(0.002)  # waiting for a variant load
                for out in outs:
                    if out.finished:
                        done[out.request_id] = out
        finally:
            for rid in ids:
                if rid not in done:
                    self.engine.abort(rid)
        return [self._full(done[r]) for r in ids]

    @staticmethod
    def _full(out: RequestOutput) -> RequestOutput:
        out.new_text, out.new_token_ids = out.text, list(out.token_ids)
        return out

    def tokenizer(self, variant: str | None = None):
        return self.engine.tokenizer(variant)

    def add_variant(self, name: str, ref: str, kind: str | None = None) -> None:
        self.engine.add_variant(name, str(ref), kind)

    def remove_variant(self, name: str) -> None:
        self.engine.remove_variant(name)

    def variants(self) -> list[VariantInfo]:
        return self.engine.variants()

    def stats(self) -> dict:
        return self.engine.stats()

    def shutdown(self) -> None:
        self.engine.shutdown()

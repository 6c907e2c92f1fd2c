"""The serving engine: a resident base model plus many deltas in one continuous batch.

``LLM`` (sync) and ``AsyncLLM`` (background loop, streaming) share one EngineConfig; see
server/engine.py for the step and server/delta_cache.py for the variant tiers. Heavy modules
(torch, transformers) load on first use of LLM / AsyncLLM.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from deltahub.server.config import EngineConfig
from deltahub.server.delta_cache import VariantInfo
from deltahub.server.errors import (
    EngineConfigError,
    EngineDeadError,
    EngineOverloadedError,
    RequestValidationError,
    UnknownVariantError,
    VariantLoadError,
)
from deltahub.server.sampling import SamplingParams
from deltahub.server.sequence import RequestOutput

if TYPE_CHECKING:
    from deltahub.server.async_llm import AsyncLLM
    from deltahub.server.llm import LLM

__all__ = [
    "LLM",
    "AsyncLLM",
    "EngineConfig",
    "EngineConfigError",
    "EngineDeadError",
    "EngineOverloadedError",
    "RequestOutput",
    "RequestValidationError",
    "SamplingParams",
    "UnknownVariantError",
    "VariantInfo",
    "VariantLoadError",
]


def __getattr__(name: str):
    if name == "LLM":
        from deltahub.server.llm import LLM

        return LLM
    if name == "AsyncLLM":
        from deltahub.server.async_llm import AsyncLLM

        return AsyncLLM
    raise AttributeError(name)

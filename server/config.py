"""EngineConfig: every setting of the engine in one dataclass, passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass, fields

from deltahub.server.errors import EngineConfigError


@dataclass
class EngineConfig:
    """Settings of one engine. ``None`` means "choose from the device / model".

    Variant tiers: ``max_gpu_variants`` GPU slots (static pools [S, ...] in every layer), optionally
    limited further by ``max_gpu_variant_bytes`` of resident packed deltas; ``max_host_variants``
    deltas kept decoded in (pinned) host memory, least recently used evicted first.
    Scheduling: FCFS; with ``skip_the_line`` a waiting request whose variant is resident may be
    admitted ahead of older ones whose variant is not, but nobody is skipped more than
    ``max_skips`` times (then admission is strictly FCFS until that request runs).
    """

    device: str = "cpu"
    dtype: str | None = None  # "float32" on CPU, "bfloat16" on CUDA
    block_size: int = 16
    num_kv_blocks: int | None = None  # default: enough for max_num_seqs full-length sequences (CPU)
    gpu_memory_utilization: float = 0.5  # CUDA: fraction of free memory given to the KV cache
    max_model_len: int | None = None  # default: the model's max_position_embeddings (<= 4096)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 4096
    max_waiting: int = 1024  # more queued requests -> EngineOverloadedError
    max_gpu_variants: int = 4
    max_gpu_variant_bytes: int | None = None
    max_host_variants: int = 8
    skip_the_line: bool = True
    max_skips: int = 16
    dynamic_loading: bool = False  # requests may name an unregistered Hub id / folder as variant
    loader_threads: int = 2
    token: str | None = None  # Hub token for private repos
    seed: int = 0  # seeds the sampler of requests that give no seed
    check_base_fingerprint: bool = True
    cpu_dequantize_deltas: bool = True  # CPU: dequantize qlinear deltas once per slot load, not per step

    def __post_init__(self) -> None:
        for name in (
            "block_size",
            "max_num_seqs",
            "max_num_batched_tokens",
            "max_gpu_variants",
            "max_host_variants",
            "loader_threads",
        ):
            if int(getattr(self, name)) < 1:
                raise EngineConfigError(f"engine setting {name} must be >= 1")
        if self.max_skips < 0:
            raise EngineConfigError("engine setting max_skips must be >= 0")

    @property
    def torch_dtype_name(self) -> str:
        if self.dtype:
            return self.dtype
        return "bfloat16" if str(self.device).startswith("cuda") else "float32"

    @classmethod
    def from_kwargs(cls, **kw) -> EngineConfig:
        """Build from keyword arguments, rejecting unknown names with a clear error."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(kw) - names)
        if unknown:
            raise EngineConfigError(f"unknown engine setting(s): {', '.join(unknown)}")
        return cls(**kw)


def parse_variant_specs(specs: list[str] | None) -> dict[str, str]:
    """CLI ``--variant NAME=REF`` values -> {name: ref}. A bare REF is named after its last path part."""
    out: dict[str, str] = {}
    for spec in specs or []:
        name, sep, ref = spec.partition("=")
        if not sep:
            ref = spec
            name = spec.rstrip("/").rsplit("/", 1)[-1].split("@", 1)[0]
        name, ref = name.strip(), ref.strip()
        if not name or not ref:
            raise EngineConfigError(f"--variant {spec!r}: expected NAME=REF")
        if name in out:
            raise EngineConfigError(f"--variant {name!r} given twice")
        out[name] = ref
    return out

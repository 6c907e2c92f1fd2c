"""Loading one variant into host memory (runs on a loader thread): a deltahub delta repo
(``delta_config.json``) or a PEFT LoRA adapter (``adapter_config.json`` + safetensors), from a
folder or the Hub. The result maps parameter names of the base to PackedTensors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from deltahub.server.errors import VariantLoadError

from deltahub.errors import BaseMismatchError, DeltahubError, ShapeMismatchError
from deltahub.format import PackedTensor

KINDS = ("delta", "lora")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass
class BaseInfo:
    """What a variant is checked against: parameter shapes, tied embeddings, fingerprint."""

    id: str
    shapes: dict[str, tuple[int, ...]]
    tied: bool
    fingerprint: Callable[[], str | None] = lambda: None


@dataclass
class HostDelta:
    """A variant decoded in host memory: ``tensors`` {base parameter name: PackedTensor}."""

    name: str
    kind: str
    folder: Path
    tensors: dict[str, PackedTensor]
    nbytes: int = 0
    has_tokenizer: bool = False
    eos_token_ids: list[int] = field(default_factory=list)


def detect_kind(folder: Path) -> str:
    if (folder / "delta_config.json").is_file():
        return "delta"
    if (folder / "adapter_config.json").is_file():
        return "lora"
    raise VariantLoadError(
        f"{folder}: neither a deltahub delta (delta_config.json) nor a PEFT LoRA "
        "adapter (adapter_config.json); compress a full fine-tune with `deltahub compress`"
    )


def _check_shape(name: str, shape: tuple[int, ...], base: BaseInfo, where: str) -> None:
    if name not in base.shapes:
        raise ShapeMismatchError(f"{where}: tensor {name!r} does not exist in base {base.id}")
    if tuple(base.shapes[name]) != tuple(shape):
        raise ShapeMismatchError(
            f"{where}: {name} has shape {tuple(shape)}, base {base.id} has {tuple(base.shapes[name])}"
        )


def _read_delta(folder: Path, base: BaseInfo, check_fingerprint: bool) -> dict[str, PackedTensor]:
    from deltahub.store import DeltaReader

    reader = DeltaReader(folder)
    want = reader.config.base_model.fingerprint
    if check_fingerprint and want:
        have = base.fingerprint()
        if have and have != want:
            raise BaseMismatchError(
                f"{folder}: made for base {reader.config.base_model.id} (fingerprint "
                f"{want[:16]}...), but the served base {base.id} has {have[:16]}..."
            )
    out: dict[str, PackedTensor] = {}
    for name in reader.names():
        p = reader.read(name)
        _check_shape(name, p.shape, base, str(folder))
        out[name] = p
    return out


def _pattern_value(module: str, patterns: dict, default):
    for key, val in (patterns or {}).items():
        if re.fullmatch(rf"(.*\.)?{key}", module):
            return val
    return default


def _read_lora(folder: Path, base: BaseInfo) -> dict[str, PackedTensor]:
    from safetensors.torch import load_file

    cfg = json.loads((folder / "adapter_config.json").read_text())
    if cfg.get("peft_type", "LORA") != "LORA":
        raise VariantLoadError(f"{folder}: PEFT type {cfg.get('peft_type')!r} is not supported (only LORA)")
    if cfg.get("use_dora"):
        raise VariantLoadError(f"{folder}: DoRA adapters are not supported")
    if cfg.get("modules_to_save"):
        raise VariantLoadError(f"{folder}: adapters with modules_to_save are not supported")
    wfile = folder / "adapter_model.safetensors"
    if not wfile.is_file():
        raise VariantLoadError(f"{folder}: no adapter_model.safetensors (pickle adapters are not loaded)")
    raw = load_file(str(wfile))
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in raw.items():
        m = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.[^.]+)?\.weight", key)
        if m is None:
            raise VariantLoadError(f"{wfile}: unsupported adapter tensor {key!r}")
        pairs.setdefault(m.group(1), {})[m.group(2)] = t
    r0, alpha0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    out: dict[str, PackedTensor] = {}
    for module, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise VariantLoadError(f"{wfile}: {module} lacks lora_A or lora_B")
        a, b = ab["lora_A"].float(), ab["lora_B"].float()
        if cfg.get("fan_in_fan_out"):
            a, b = a.T.contiguous(), b.T.contiguous()
        r = _pattern_value(module, cfg.get("rank_pattern"), r0)
        alpha = _pattern_value(module, cfg.get("alpha_pattern"), alpha0)
        if a.shape[0] != r or b.shape[1] != r:
            raise VariantLoadError(f"{wfile}: {module} has rank {a.shape[0]}, adapter_config says {r}")
        scale = alpha / (r**0.5 if cfg.get("use_rslora") else r)
        name = f"{module}.weight"
        _check_shape(name, (b.shape[0], a.shape[1]), base, str(wfile))
        out[name] = PackedTensor(
            "lowrank",
            (b.shape[0], a.shape[1]),
            {"lora_A": a, "lora_B": (b * scale).contiguous()},
            codec="peft-lora",
        )
    return out


def _eos_ids(folder: Path) -> list[int]:
    f = folder / "generation_config.json"
    if not f.is_file():
        return []
    eos = json.loads(f.read_text()).get("eos_token_id")
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


def _resolve(ref: str, kind: str | None, token: str | None) -> Path:
    """A local folder, or a Hub repo downloaded as a delta (or, failing that, as a PEFT adapter)."""
    from deltahub.errors import ModelSourceError
    from deltahub.sources import resolve_model

    if kind == "lora":
        return Path(resolve_model(ref, token=token, kind="adapter").path)
    try:
        return Path(resolve_model(ref, token=token, kind="delta").path)
    except ModelSourceError as e:
        if kind is None and "not a deltahub delta" in str(e):
            return Path(resolve_model(ref, token=token, kind="adapter").path)
        raise


def load_variant(
    name: str,
    ref: str,
    kind: str | None,
    *,
    base: BaseInfo,
    token: str | None = None,
    pin: bool = False,
    check_fingerprint: bool = True,
) -> HostDelta:
    """Resolve ``ref`` (folder or Hub id), read and check it. Every failure is a VariantLoadError."""
    try:
        folder = _resolve(ref, kind, token)
        found = detect_kind(folder)
        if kind is not None and kind != found:
            raise VariantLoadError(f"{ref}: is a {found}, not a {kind}")
        tensors = (
            _read_delta(folder, base, check_fingerprint) if found == "delta" else _read_lora(folder, base)
        )
    except VariantLoadError:
        raise
    except DeltahubError as e:
        raise VariantLoadError(f"variant {name!r} ({ref}): {e}") from e
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise VariantLoadError(f"variant {name!r} ({ref}): {type(e).__name__}: {e}") from e
    if base.tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # tied: the head moves too
    if pin:
        for p in tensors.values():
            p.parts = {k: v.pin_memory() for k, v in p.parts.items()}
    nbytes = sum(p.nbytes for n, p in tensors.items() if not (base.tied and n == "lm_head.weight"))
    return HostDelta(
        name,
        found,
        folder,
        tensors,
        nbytes,
        has_tokenizer=any((folder / f).is_file() for f in TOKENIZER_FILES),
        eos_token_ids=_eos_ids(folder),
    )

"""The model card (README.md) of a delta repo, rendered from ``model_cards/delta.md``.

YAML: base_model (when it is a Hub id), base_model_relation: adapter, library_name: deltahub,
tags [deltahub, delta-compression, <codec>], pipeline_tag and license copied from the fine-tune.
Body: source fine-tune and revision, codec settings, size before/after and ratio, a quality table
when an evaluation is given, and copy-paste usage.
"""

from __future__ import annotations

import json
import math
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from deltahub.store import DeltaConfig

TEMPLATE = "delta.md"
LICENSE_KEYS = ("license", "license_name", "license_link")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


def is_hub_id(ref: str) -> bool:
    """True for ``name`` / ``org/name`` that is not an existing local path."""
    return bool(_HUB_ID.match(ref)) and not os.path.exists(ref) and ".." not in ref


def template_text() -> str:
    return resources.files("deltahub.model_cards").joinpath(TEMPLATE).read_text()


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def codec_name(config: DeltaConfig) -> str:
    c = config.compression
    return str(c.get("method") or c.get("codec") or "unknown")


def bf16_bytes(config: DeltaConfig) -> int:
    """Bytes of the fine-tune's weights in bf16 (every tensor the delta covers)."""
    return 2 * sum(math.prod(t["shape"]) for t in config.tensors.values())


def payload_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the delta's tensor files."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))


def variant_name(ref: str) -> str:
    """A short serving name from a repo id or path: ``org/Model-FT-delta`` -> ``model-ft``."""
    name = ref.rstrip("/").rsplit("/", 1)[-1].lower().removesuffix("-delta")
    return re.sub(r"[^a-z0-9._-]+", "-", name).strip("-") or "variant"


def card_data(config: DeltaConfig, finetune_card: dict[str, Any]) -> dict[str, Any]:
    """The YAML header of a delta's card."""
    data: dict[str, Any] = {}
    if is_hub_id(config.base_model.id):
        data["base_model"] = config.base_model.id
        data["base_model_relation"] = "adapter"
    data["library_name"] = "deltahub"
    data["tags"] = ["deltahub", "delta-compression", codec_name(config)]
    data["pipeline_tag"] = finetune_card.get("pipeline_tag") or "text-generation"
    for key in LICENSE_KEYS:
        if finetune_card.get(key):
            data[key] = finetune_card[key]
    return data


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True)
    return "–" if v is None else str(v)


def _link(ref: str) -> str:
    """A Hub id as a link relative to the Hub that shows the card (no host baked in); a path as code."""
    return f"[{ref}](/{ref})" if is_hub_id(ref) else f"`{ref}`"


def _settings(compression: dict[str, Any]) -> list[tuple[str, str]]:
    """Rows of the settings table: one per setting, one per tensor group."""
    rows = []
    for key, value in compression.items():
        if key == "groups" and isinstance(value, dict):
            for group, d in value.items():
                rows.append((f"{group} tensors", ", ".join(f"{k} {_fmt(v)}" for k, v in d.items()
                                                             if v is not None)))
        elif isinstance(value, dict):
            rows.append((key, ", ".join(f"{k} {_fmt(v)}" for k, v in value.items() if v is not None)))
        else:
            rows.append((key, _fmt(value)))
    return rows


def render(config: DeltaConfig, folder: str | os.PathLike, *, repo_id: str,
           finetune_card: dict[str, Any] | None = None, quality: list[dict[str, Any]] | None = None,
           quality_note: str | None = None) -> str:
    """The README.md text of the delta in ``folder`` published as ``repo_id``.

    quality: rows of an evaluation (same keys in every row, shown as columns in that order), e.g.
    ``{"dataset": ..., "metric": "perplexity", "fine-tune": 9.81, "reconstructed": 9.83}``.
    """
    from deltahub import hub

    before, after = bf16_bytes(config), payload_bytes(folder)
    groups = [{"name": name, "codec": _group_codec(g), "tensors": g["tensors"],
               "raw": human_bytes(g["raw_bytes"]), "stored": human_bytes(g["stored_bytes"])}
              for name, g in sorted(config.group_summary().items())]
    columns = list(quality[0]) if quality else []
    context = dict(
        repo_id=repo_id, repo_name=repo_id.rsplit("/", 1)[-1], variant_name=variant_name(repo_id),
        finetuned_md=_link(config.finetuned_model.id),
        finetuned_revision=config.finetuned_model.revision,
        base_id=config.base_model.id, base_md=_link(config.base_model.id),
        base_revision=config.base_model.revision, base_fingerprint=config.base_model.fingerprint,
        settings=_settings(config.compression),
        size_before=human_bytes(before), size_after=human_bytes(after),
        ratio=f"{before / after:.1f}×" if after else "–", groups=groups,
        quality=[[_fmt(row.get(c)) for c in columns] for row in quality or []], quality_columns=columns,
        quality_note=quality_note or "Held-out evaluation of the reconstructed model (base + this delta) "
                                     "against the original fine-tune.",
    )
    text = hub.render_card(template_text(), card_data(config, finetune_card or {}), **context)
    return re.sub(r"\n{3,}", "\n\n", text)


def _group_codec(g: dict[str, Any]) -> str:
    parts = [g["codec"]]
    if g.get("bits"):
        parts.append(f"{g['bits']}-bit")
    if g.get("sparsity") and g["sparsity"] != "none":
        parts.append(g["sparsity"])
    if g["kind"] not in ("qlinear", g["codec"]):
        parts.append(g["kind"])
    return " ".join(str(p) for p in parts)


RECONSTRUCTED = """---
{{ card_data }}
---

# {{ name }}

The full fine-tune {{ finetuned_md }} rebuilt by `deltahub reconstruct` from the delta
{{ delta_md }} over its base {{ base_md }}. An ordinary transformers model: load it with
`AutoModelForCausalLM.from_pretrained`. Its weights equal the fine-tune's up to the delta codec's
quantization error ({{ codec }}).
"""


def render_reconstructed(config: DeltaConfig, *, delta: str, delta_card: dict[str, Any]) -> str:
    """The card of a model rebuilt from ``delta`` (base_model_relation: finetune)."""
    from deltahub import hub

    data: dict[str, Any] = {}
    if is_hub_id(config.base_model.id):
        data.update(base_model=config.base_model.id, base_model_relation="finetune")
    data.update(library_name="transformers", tags=["deltahub", "reconstructed"],
                pipeline_tag=delta_card.get("pipeline_tag") or "text-generation")
    data.update({k: delta_card[k] for k in LICENSE_KEYS if delta_card.get(k)})
    return hub.render_card(RECONSTRUCTED, data, name=variant_name(delta),
                           finetuned_md=_link(config.finetuned_model.id), delta_md=_link(delta),
                           base_md=_link(config.base_model.id), codec=codec_name(config))


def write(folder: str | os.PathLike, config: DeltaConfig, **kwargs: Any) -> Path:
    """Render the card (see ``render``) into ``folder/README.md``."""
    path = Path(folder) / "README.md"
    path.write_text(render(config, folder, **kwargs))
    return path

"""``push``: fine-tune (local folder or Hub id) -> compressed delta repo on the Hub, with its card.

Steps: resolve the fine-tune, find its base (``infer_base``), compress (cached: the same inputs
and settings give the same folder, so re-pushing makes no new commit), optionally evaluate, write
the model card, upload. The delta repo defaults to ``<fine-tune id>-delta``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltahub import __version__, constants, hub, modelcard
from deltahub.errors import HubError, ModelSourceError
from deltahub.sources import ResolvedModel, resolve_model, split_revision

# config.json fields that a base and its full fine-tunes share (checked before trusting a guess).
ARCH_KEYS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
             "num_attention_heads", "num_key_value_heads", "head_dim", "n_embd", "n_layer", "d_model")
DELETE_PATTERNS = ["*.safetensors", "*.json"]  # stale shards / index of an earlier push


@dataclass(frozen=True)
class PushOutcome:
    repo_id: str
    url: str
    commit: str
    changed: bool  # False: the repo already held exactly this delta (no new commit)
    folder: Path  # the delta folder that was uploaded
    base: str
    base_inferred_from: str | None  # None when --base was given


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _same_architecture(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = [k for k in ARCH_KEYS if k in a or k in b]
    return bool(keys) and all(a.get(k) == b.get(k) for k in keys)


def infer_base(ft: ResolvedModel, *, token: str | None = None) -> tuple[str, str]:
    """The base model of a fine-tune and where that came from: ``(ref, how)``.

    1. The model card's ``base_model`` (the Hub's model tree uses it): authoritative.
    2. ``config.json``'s ``_name_or_path`` is only a hint -- it is whatever path the training
       script loaded from (often a local checkpoint, sometimes the fine-tune itself). It is used
       only if it is a Hub id other than the fine-tune and that repo's config.json has the same
       architecture and sizes.
    ModelSourceError when neither names a base: pass --base.
    """
    card = hub.read_card_data(ft.path)
    named = card.get("base_model")
    if isinstance(named, list):
        if len(named) > 1:
            raise ModelSourceError(f"the model card of {ft.id} names several base models "
                                   f"({', '.join(named)}); pass --base")
        named = named[0] if named else None
    if named:
        return str(named), "model card (base_model)"
    config = _read_json(ft.path / "config.json")
    hint = config.get("_name_or_path")
    if isinstance(hint, str) and modelcard.is_hub_id(hint) and split_revision(hint)[0] != ft.id:
        try:
            candidate = resolve_model(hint, token=token, kind="meta")
        except ModelSourceError:
            candidate = None
        if candidate is not None and _same_architecture(config, _read_json(candidate.path / "config.json")):
            return hint, "config.json (_name_or_path, a Hub model of the same architecture and sizes)"
    raise ModelSourceError(f"cannot tell the base model of {ft.id}: its model card has no base_model and its "
                           f"config.json names no Hub model of the same architecture; pass --base BASE")


def default_repo_id(ft: ResolvedModel, *, token: str | None = None) -> str:
    """``<fine-tune repo id>-delta``; for a local folder ``<your user>/<folder name>-delta``."""
    if not ft.is_local:
        return f"{ft.id}-delta"
    try:
        user = hub.whoami(token)
    except HubError as e:
        raise HubError(f"{e} (or name the delta repo with --repo-id)") from None
    return f"{user}/{ft.path.name}-delta"


def _delta_folder(base: ResolvedModel, ft: ResolvedModel, settings: dict[str, Any]) -> Path:
    """Cache folder of the delta of these inputs and settings (``constants.cache_dir()/deltas``)."""
    from deltahub.fingerprint import fingerprint

    key = {"base": [base.id, base.revision, fingerprint(base.path)],
           "finetuned": [ft.id, ft.revision, fingerprint(ft.path)],
           "settings": settings, "deltahub": __version__}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:24]
    return constants.cache_dir() / "deltas" / digest


def build_delta(base: ResolvedModel, ft: ResolvedModel, compress_config, *, progress: bool = True) -> Path:
    """Compress ``ft`` against ``base`` into the cache, or reuse an earlier identical run."""
    from deltahub.compress import compress
    from deltahub.store import CONFIG_NAME

    folder = _delta_folder(base, ft, asdict(compress_config))
    if (folder / CONFIG_NAME).is_file():
        return folder
    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        compress(base.path, ft.path, tmp, compress_config, progress=progress)
        _record_refs(tmp, base, ft)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def _record_refs(folder: Path, base: ResolvedModel, ft: ResolvedModel) -> None:
    """Name base and fine-tune in delta_config.json as the user did (Hub id + commit), not by the
    cache folder they were read from."""
    from deltahub.store import CONFIG_NAME, DeltaConfig

    path = folder / CONFIG_NAME
    cfg = DeltaConfig.from_json(path.read_text(), source=str(path))
    for ref, model in ((cfg.base_model, base), (cfg.finetuned_model, ft)):
        ref.id = str(model.path) if model.is_local else model.id
        ref.revision = model.revision
    tmp = path.with_name(CONFIG_NAME + ".tmp")
    tmp.write_text(cfg.to_json())
    os.replace(tmp, path)


def evaluate(base: ResolvedModel, ft: ResolvedModel, delta: Path, eval_data: str | None) -> tuple[list, str]:
    """``push --evaluate``: held-out perplexity of base, fine-tune and reconstruction
    (deltahub.evaluate) as the card's quality table, and the sentence that introduces it."""
    from deltahub.evaluate import evaluate_delta

    rows = evaluate_delta(delta, base=base.path, finetuned=ft.path, eval_data=eval_data)
    what = f"`{Path(eval_data).name}`" if eval_data else "deltahub's built-in held-out English prose"
    return rows, (f"Perplexity on {what} of the base, the original fine-tune and the reconstruction "
                  f"(base + this delta); lower is better.")


def push(finetuned: str, *, base: str | None = None, repo_id: str | None = None, private: bool = False,
         revision: str | None = None, token: str | None = None, commit_message: str | None = None,
         compress_config=None, run_evaluation: bool = False, eval_data: str | None = None,
         progress: bool = True, log: Callable[[str], None] | None = None) -> PushOutcome:
    """Compress ``finetuned`` (``org/name[@rev]`` or a folder) and upload the delta.

    ``revision``: the branch of the delta repo to push to (default main); the fine-tune's and the
    base's own revisions go after ``@``.
    """
    from deltahub.compress import CompressConfig

    say = log or (lambda msg: print(msg, file=sys.stderr))
    ft = resolve_model(finetuned, token=token)
    how = None
    if base is None:
        base, how = infer_base(ft, token=token)
        say(f"base model: {base} (from the {how} of {ft.id})")
    b = resolve_model(base, token=token)
    repo_id = repo_id or default_repo_id(ft, token=token)
    cfg = compress_config or CompressConfig()
    say(f"compressing {ft.id} against {b.id} ({cfg.method}, {cfg.bits}-bit, sparsity {cfg.sparsity})")
    folder = build_delta(b, ft, cfg, progress=progress)
    quality, note = evaluate(b, ft, folder, eval_data) if run_evaluation else (None, None)
    from deltahub.store import DeltaReader

    config = DeltaReader(folder).config
    modelcard.write(folder, config, repo_id=repo_id, finetune_card=hub.read_card_data(ft.path),
                    quality=quality, quality_note=note)
    message = commit_message or f"deltahub: delta of {ft.id} over {b.id} ({modelcard.codec_name(config)})"
    result = hub.upload_folder(folder, repo_id, token=token, private=private, revision=revision,
                               commit_message=message, delete_patterns=DELETE_PATTERNS)
    return PushOutcome(repo_id, result.url, result.commit, result.changed, folder, b.id, how)


def push_reconstructed(folder: str | os.PathLike, delta: str, repo_id: str, *, token: str | None = None,
                       private: bool = False) -> hub.PushResult:
    """Upload a model rebuilt by ``deltahub reconstruct`` as an ordinary model repo, with a card
    (written when the folder has none) naming its base and the delta it came from."""
    from deltahub.store import DeltaReader

    folder = Path(folder)
    d = resolve_model(delta, token=token, kind="delta")
    config = DeltaReader(d.path).config
    if not (folder / "README.md").is_file():
        text = modelcard.render_reconstructed(config, delta=d.id, delta_card=hub.read_card_data(d.path))
        (folder / "README.md").write_text(text)
    return hub.upload_folder(folder, repo_id, token=token, private=private,
                             commit_message=f"deltahub: {d.id} reconstructed over {config.base_model.id}")

"""The Hugging Face Hub, through the real ``huggingface_hub`` client (the only module importing it).

Resolve/download (``resolve_repo``), upload (``upload_folder``), model-card I/O (``read_card_data``,
``render_card``) and the Hub-side base fingerprint (``remote_fingerprint``).

Environment: huggingface_hub reads its variables once, at import. deltahub reads them at call time
(deltahub.constants) and passes them explicitly -- ``endpoint=`` ($HF_ENDPOINT), ``cache_dir=``
($HF_HOME / $HF_HUB_CACHE), ``local_files_only=`` ($HF_HUB_OFFLINE), ``token=`` (--token, else the
client's own lookup: $HF_TOKEN, then the stored login) -- so a process may set them after
huggingface_hub was imported (tests, ``deltahub demo``). The two switches with no per-call
parameter (offline, Xet) are copied into ``huggingface_hub.constants`` before each call, and
HF_HUB_DISABLE_PROGRESS_BARS=1 set later still turns the client's progress bars off.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltahub import constants
from deltahub.errors import DeltahubError, HubError, ModelSourceError
from deltahub.sources import ResolvedModel

# What a model / delta needs; never pickle files.
TOKENIZER_FILES = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt", "spiece.model",
                   "chat_template.jinja", "chat_template.json", "additional_chat_templates/*.jinja"]
META_FILES = ["config.json", "generation_config.json", "README.md", *TOKENIZER_FILES]
WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json"]
DELTA_CONFIG = "delta_config.json"
PATTERNS = {"model": WEIGHT_FILES + META_FILES, "delta": [DELTA_CONFIG, *WEIGHT_FILES, *META_FILES],
            "meta": META_FILES, "adapter": ["adapter_config.json", *WEIGHT_FILES, *META_FILES]}
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def _sync_client() -> None:
    """Copy the import-time switches of huggingface_hub from the current environment."""
    from huggingface_hub import constants as hf_constants

    hf_constants.HF_HUB_OFFLINE = constants.hf_offline()
    hf_constants.HF_HUB_DISABLE_XET = constants.hf_disable_xet()
    if constants.hf_disable_progress_bars():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


def _api(token: str | None = None):
    from huggingface_hub import HfApi

    _sync_client()
    return HfApi(endpoint=constants.hf_endpoint(), token=token, library_name="deltahub")


def repo_url(repo_id: str) -> str:
    """The web address of a model repo on the current endpoint."""
    return f"{constants.hf_endpoint()}/{repo_id}"


def whoami(token: str | None = None) -> str:
    """The user name the token (or the environment's) belongs to."""
    api = _api(token)
    with _translate("your user name", error=HubError, action="look up"):
        return str(api.whoami(token=token)["name"])


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    network = {"TransportError", "ConnectError", "TimeoutException", "OfflineModeIsEnabled"}
    return isinstance(e, (ConnectionError, TimeoutError)) or bool(names & network)


@contextlib.contextmanager
def _translate(repo_id: str, revision: str | None = None, *, error: type[DeltahubError] = ModelSourceError,
               action: str = "download") -> Iterator[None]:
    """Turn the client's exceptions into one-line deltahub errors naming the repo and the endpoint."""
    from huggingface_hub import errors as hf

    where = constants.hf_endpoint()
    at = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except DeltahubError:
        raise
    except hf.LocalTokenNotFoundError:
        raise error(f"no Hub token found (needed to {action} {at}): pass --token, set HF_TOKEN or "
                    f"log in") from None
    except hf.GatedRepoError:
        raise error(f"{at} is gated on {where}: accept its conditions there and pass a token "
                    f"(--token or HF_TOKEN)") from None
    except hf.RepositoryNotFoundError:
        raise error(f"{at}: repository not found on {where}, or it is private and no valid token was given "
                    f"(--token or HF_TOKEN)") from None
    except hf.RevisionNotFoundError:
        raise error(f"{repo_id}: revision {revision!r} not found on {where}") from None
    except hf.LocalEntryNotFoundError:
        if constants.hf_offline():
            raise error(f"{at}: not in the local cache {constants.hf_hub_cache()} and HF_HUB_OFFLINE=1 "
                        f"forbids downloading it") from None
        raise error(f"{at}: cannot reach {where} and the repo is not in the local cache "
                    f"{constants.hf_hub_cache()}") from None
    except hf.HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        detail = (getattr(e, "server_message", None) or str(e)).strip().splitlines()[0]
        if status == 401:
            raise HubError(f"{where} refused the token for {at} (HTTP 401): pass a valid one with --token "
                           f"or HF_TOKEN") from None
        if status == 403:
            raise HubError(f"{where} forbids this {action} on {at} (HTTP 403): the token lacks write access "
                           f"or the namespace is not yours ({detail})") from None
        raise error(f"{where}: {action} of {at} failed (HTTP {status}): {detail}") from None
    except Exception as e:
        if _is_network_error(e):
            raise error(f"cannot reach {where} to {action} {at}: {e}") from None
        raise


def _check_files(repo_id: str, names: list[str], kind: str) -> None:
    """Refuse repos that hold no usable weights (pickle only) or are not deltas."""
    if kind == "delta" and DELTA_CONFIG not in names:
        raise ModelSourceError(f"{repo_id} is not a deltahub delta (no {DELTA_CONFIG}); to use it as a "
                               f"model, pass it as --finetuned / --base")
    if kind in ("model", "delta") and not any(n.endswith(".safetensors") for n in names):
        pickles = sorted(n for n in names if n.lower().endswith(PICKLE_SUFFIXES))
        if pickles:
            raise ModelSourceError(
                f"{repo_id} has only pickle weights ({', '.join(pickles[:3])}); deltahub never loads pickle "
                f"files (they can run code). Convert them to safetensors "
                f"(save_pretrained(..., safe_serialization=True)) and push that")
        raise ModelSourceError(f"{repo_id} has no *.safetensors weights")


def _remote_weight_files(repo_id: str, commit: str, names: list[str], token: str | None) -> list[str]:
    """The weight files of a Hub repo, chosen as deltahub.checkpoint.weight_files chooses local ones:
    the index's weight_map, else model.safetensors, else every top-level *.safetensors."""
    from huggingface_hub import hf_hub_download

    from deltahub.checkpoint import INDEX_NAME, SINGLE_NAME

    if INDEX_NAME in names:
        index = hf_hub_download(repo_id, INDEX_NAME, revision=commit, cache_dir=constants.hf_hub_cache(),
                                endpoint=constants.hf_endpoint(), token=token, library_name="deltahub")
        try:
            files = sorted(set(json.loads(Path(index).read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelSourceError(f"{repo_id}/{INDEX_NAME}: malformed safetensors index ({e})") from None
        missing = [f for f in files if f not in names]
        if missing:
            raise ModelSourceError(f"{repo_id}: {INDEX_NAME} names files the repo lacks: "
                                   f"{', '.join(missing[:3])}")
        return files
    if SINGLE_NAME in names:
        return [SINGLE_NAME]
    found = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if not found:
        _check_files(repo_id, names, "model")
        raise ModelSourceError(f"{repo_id} has no top-level *.safetensors weights")
    return found


def resolve_repo(repo_id: str, *, revision: str | None = None, token: str | None = None,
                 kind: str = "model") -> ResolvedModel:
    """Download what ``kind`` needs of a Hub repo into the cache and return its snapshot folder.

    kind: "model" (weights + config + tokenizer + card), "delta" (a deltahub delta repo) or "meta"
    (config, tokenizer and card only). ``revision``: branch, tag or commit (default main). Offline
    ($HF_HUB_OFFLINE=1) the cached snapshot is used as is.
    """
    from huggingface_hub import snapshot_download

    if kind not in PATTERNS:
        raise ValueError(f"kind must be one of {sorted(PATTERNS)}, got {kind!r}")
    offline = constants.hf_offline()
    api = _api(token)
    with _translate(repo_id, revision):
        patterns = PATTERNS[kind]
        if not offline:
            info = api.model_info(repo_id, revision=revision, token=token)
            names = [s.rfilename for s in info.siblings or []]
            _check_files(repo_id, names, kind)
            if kind == "model":  # only the files transformers loads (not e.g. consolidated.safetensors)
                weights = _remote_weight_files(repo_id, info.sha, names, token)
                patterns = [*weights, "*.safetensors.index.json", *META_FILES]
        path = snapshot_download(repo_id, revision=revision, cache_dir=constants.hf_hub_cache(),
                                 endpoint=constants.hf_endpoint(), token=token, local_files_only=offline,
                                 allow_patterns=patterns, library_name="deltahub")
    path = Path(path)
    try:
        _check_files(repo_id, [p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()], kind)
    except ModelSourceError as e:
        if offline:
            raise ModelSourceError(f"{e} in the local cache, and HF_HUB_OFFLINE=1 forbids downloading "
                                   f"them") from None
        raise
    return ResolvedModel(path, repo_id, path.name, False)


# ---------------------------------------------------------------- model cards


def read_card_data(folder: str | os.PathLike) -> dict[str, Any]:
    """The YAML header of ``folder/README.md`` as a dict ({} when there is no card)."""
    from huggingface_hub import ModelCard

    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    try:
        return ModelCard.load(readme, ignore_metadata_errors=True).data.to_dict()
    except Exception as e:  # a malformed card should not hide the rest of the model
        raise ModelSourceError(f"{readme}: unreadable model card header ({e})") from None


def render_card(template: str, data: dict[str, Any], **context: Any) -> str:
    """Render a Jinja model-card template; ``{{ card_data }}`` becomes the YAML built from ``data``."""
    from huggingface_hub import ModelCard, ModelCardData

    return str(ModelCard.from_template(ModelCardData(**data), template_str=template, **context))


# ---------------------------------------------------------------- fingerprints


def remote_fingerprint(repo_id: str, *, revision: str | None = None, token: str | None = None) -> str | None:
    """The base fingerprint (deltahub.fingerprint's recipe) from the Hub's per-file LFS sha256,
    without downloading weights; cached per commit. None when a weight file has no LFS sha256."""
    from deltahub import fingerprint

    api = _api(token)
    with _translate(repo_id, revision, action="read metadata of"):
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token)
        cached = _cache_path("hub-fingerprints", hashlib.sha256(
            f"{constants.hf_endpoint()}|{repo_id}|{info.sha}".encode()).hexdigest())
        if cached.is_file():
            return json.loads(cached.read_text())["fingerprint"]
        siblings = {s.rfilename: s for s in info.siblings or []}
        hashes = []
        for name in _remote_weight_files(repo_id, info.sha, list(siblings), token):
            lfs = siblings[name].lfs
            if not lfs or not lfs.get("sha256"):
                return None
            hashes.append((name, lfs["sha256"]))
    fp = fingerprint.combine(hashes)
    _write_json(cached, {"repo_id": repo_id, "commit": info.sha, "fingerprint": fp})
    return fp


def _cache_path(*parts: str) -> Path:
    return constants.cache_dir().joinpath(*parts[:-1], parts[-1] + ".json")


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


# ---------------------------------------------------------------- upload


@dataclass(frozen=True)
class PushResult:
    """Outcome of an upload: the repo's ``url``, the ``commit`` now at the revision, and whether
    this upload made that commit (``changed``) or found everything already there."""

    repo_id: str
    url: str
    commit: str
    changed: bool


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _file_hashes(path: Path) -> tuple[int, str, str]:
    """(size, sha256, git blob sha1) of a file, reading it once in chunks."""
    size = path.stat().st_size
    sha256, sha1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % size)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


def _local_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _unchanged(folder: Path, remote: dict[str, Any], delete_patterns: list[str]) -> bool:
    """True when every local file is on the remote with the same content and no remote file
    would be deleted: then an upload would be an empty commit."""
    local = _local_files(folder)
    stale = [n for n in remote if n not in local and any(fnmatch.fnmatch(n, p) for p in delete_patterns)]
    if stale:
        return False
    for name in local:
        r = remote.get(name)
        if r is None:
            return False
        size, sha256, sha1 = _file_hashes(folder / name)
        if r.size is not None and r.size != size:
            return False
        same = r.lfs.get("sha256") == sha256 if r.lfs else r.blob_id == sha1
        if not same:
            return False
    return True


def upload_folder(folder: str | os.PathLike, repo_id: str, *, token: str | None = None, private: bool = False,
                  revision: str | None = None, commit_message: str | None = None,
                  delete_patterns: list[str] | None = None) -> PushResult:
    """create_repo(exist_ok=True) + upload_folder of a local folder (hidden files skipped).

    Remote files matching ``delete_patterns`` that the folder no longer has are deleted in the same
    commit. When the remote already holds exactly these files, nothing is committed.
    """
    folder = Path(folder)
    delete_patterns = list(delete_patterns or [])
    api = _api(token)
    with _translate(repo_id, revision, error=HubError, action="upload"):
        url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model", token=token))
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, token=token)
        info = api.model_info(repo_id, revision=revision, files_metadata=True, token=token)
        remote = {s.rfilename: s for s in info.siblings or []}
        if info.sha and remote and _unchanged(folder, remote, delete_patterns):
            return PushResult(repo_id, url, info.sha, False)
        commit = api.upload_folder(repo_id=repo_id, folder_path=str(folder), revision=revision, token=token,
                                   commit_message=commit_message or f"Upload {folder.name} with deltahub",
                                   ignore_patterns=[".*", "**/.*"], delete_patterns=delete_patterns or None)
    return PushResult(repo_id, url, commit.oid, commit.oid != info.sha)

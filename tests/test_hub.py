"""deltahub.hub against the embedded Hub with the real huggingface_hub client: resolve/download,
pickle refusal, offline mode, revisions, tokens, typed errors, no-op re-upload, fingerprints."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from deltahub import fingerprint, hub
from deltahub.errors import HubError, ModelSourceError
from deltahub.sources import resolve_model

TOKENS = ["alice:write:hf_alice", "bob:read:hf_bob"]


@pytest.fixture
def make_hub(tmp_path, monkeypatch):
    """Start an embedded Hub (optionally with tokens) and point this process's client at it."""
    from deltahub.localhub import LocalHub

    hubs = []

    def start(tokens=()):
        h = LocalHub(tmp_path / f"hub{len(hubs)}", tokens=tokens).start()
        hubs.append(h)
        for k, v in h.client_env().items():
            monkeypatch.setenv(k, v)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
        monkeypatch.setenv("DELTAHUB_CACHE", str(tmp_path / "dh"))
        for k in ("HF_HUB_CACHE", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE",
                  "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(k, raising=False)
        return h

    yield start
    for h in hubs:
        h.stop()


def fake_model(folder, *, seed=0, shards=1, pickle_only=False, extra=()):
    """A small model folder: config.json, README with base_model, safetensors (or a .bin) weights."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (folder / "README.md").write_text("---\nlicense: mit\nbase_model: org/base\n---\n# m\n")
    g = torch.Generator().manual_seed(seed)
    tensors = {f"layer{i}.weight": torch.randn(16, 8, generator=g) for i in range(2)}
    if pickle_only:
        torch.save(tensors, folder / "pytorch_model.bin")
    elif shards == 1:
        save_file(tensors, str(folder / "model.safetensors"))
    else:
        weight_map = {}
        for i, (k, t) in enumerate(tensors.items()):
            name = f"model-{i + 1:05d}-of-{len(tensors):05d}.safetensors"
            save_file({k: t}, str(folder / name))
            weight_map[k] = name
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name in extra:
        (folder / name).write_bytes(b"not needed")
    return folder


def test_resolve_downloads_only_needed_files(make_hub, tmp_path):
    make_hub()
    src = fake_model(tmp_path / "src", extra=["pytorch_model.bin", "notes.txt"])
    pushed = hub.upload_folder(src, "org/m")
    assert pushed.changed and len(pushed.commit) == 40
    r = resolve_model("org/m")
    assert not r.is_local and r.id == "org/m" and r.revision == pushed.commit
    assert str(r.path).startswith(str(tmp_path / "hf" / "hub"))  # HF_HOME honoured
    assert sorted(p.name for p in r.path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert hub.read_card_data(r.path)["base_model"] == "org/base"


def test_sharded_model_and_fingerprint_match_local(make_hub, tmp_path):
    make_hub()
    src = fake_model(tmp_path / "src", shards=2, extra=["consolidated.safetensors"])
    hub.upload_folder(src, "org/sharded")
    r = hub.resolve_repo("org/sharded")
    files = sorted(p.name for p in r.path.iterdir())
    assert "consolidated.safetensors" not in files  # not in the index's weight_map
    assert "model-00002-of-00002.safetensors" in files
    local = fingerprint.fingerprint(src)
    assert hub.remote_fingerprint("org/sharded") == local == fingerprint.fingerprint(r.path)
    other = fake_model(tmp_path / "other", seed=1, shards=2)
    hub.upload_folder(other, "org/other")
    assert hub.remote_fingerprint("org/other") != local


def test_pickle_only_repo_is_refused(make_hub, tmp_path):
    make_hub()
    hub.upload_folder(fake_model(tmp_path / "p", pickle_only=True), "org/pickled")
    with pytest.raises(ModelSourceError, match=r"only pickle weights \(pytorch_model.bin\)"):
        resolve_model("org/pickled")
    with pytest.raises(ModelSourceError, match="not a deltahub delta"):
        resolve_model("org/pickled", kind="delta")


def test_revisions(make_hub, tmp_path):
    make_hub()
    src = fake_model(tmp_path / "src")
    first = hub.upload_folder(src, "org/m").commit
    fake_model(src, seed=5)
    second = hub.upload_folder(src, "org/m", commit_message="v2").commit
    assert first != second
    old = resolve_model(f"org/m@{first}")
    new = resolve_model("org/m")
    assert (old.revision, new.revision) == (first, second)
    assert fingerprint.fingerprint(old.path) != fingerprint.fingerprint(new.path)
    with pytest.raises(ModelSourceError, match="revision 'nope' not found"):
        resolve_model("org/m@nope")
    fake_model(src, seed=9)
    branch = hub.upload_folder(src, "org/m", revision="v3")  # a new branch; main is untouched
    assert resolve_model("org/m@v3").revision == branch.commit != second
    assert resolve_model("org/m").revision == second


def test_offline_uses_the_cache(make_hub, tmp_path, monkeypatch):
    h = make_hub()
    hub.upload_folder(fake_model(tmp_path / "src"), "org/m")
    online = resolve_model("org/m")
    h.stop()  # nothing to talk to any more
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = resolve_model("org/m")
    assert (offline.path, offline.revision) == (online.path, online.revision)
    with pytest.raises(ModelSourceError, match="HF_HUB_OFFLINE=1"):
        resolve_model("org/never-downloaded")


def test_unreachable_hub_is_a_clear_error(make_hub, tmp_path):
    h = make_hub()
    h.stop()
    with pytest.raises(ModelSourceError, match="cannot reach"):
        resolve_model("org/m")


def test_errors_and_tokens(make_hub, tmp_path, monkeypatch):
    make_hub(tokens=TOKENS)
    src = fake_model(tmp_path / "src")
    with pytest.raises(ModelSourceError, match="repository not found"):
        resolve_model("org/missing")
    hub.upload_folder(src, "alice/secret", token="hf_alice", private=True)
    with pytest.raises(ModelSourceError, match="private and no valid token"):
        resolve_model("alice/secret")
    assert resolve_model("alice/secret", token="hf_bob").revision  # any token may read
    monkeypatch.setenv("HF_TOKEN", "hf_alice")  # the environment's token is used when none is passed
    assert resolve_model("alice/secret").revision
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubError, match="HTTP 401"):
        hub.upload_folder(src, "alice/other", token="hf_wrong")
    with pytest.raises(HubError, match="HTTP 403"):
        hub.upload_folder(src, "bob/mine", token="hf_bob")  # read-only token


def test_reupload_unchanged_makes_no_commit(make_hub, tmp_path):
    from huggingface_hub import HfApi

    h = make_hub()
    api = HfApi(endpoint=h.url)
    src = fake_model(tmp_path / "src", shards=2)
    first = hub.upload_folder(src, "org/d", delete_patterns=["*.safetensors", "*.json"])
    again = hub.upload_folder(src, "org/d", delete_patterns=["*.safetensors", "*.json"])
    assert (again.changed, again.commit) == (False, first.commit)
    assert len(api.list_repo_commits("org/d")) == 2  # repo creation + one upload
    # a changed layout: stale shards are deleted in the same commit
    for p in src.glob("model*"):
        p.unlink()
    fake_model(src, seed=3)
    third = hub.upload_folder(src, "org/d", delete_patterns=["*.safetensors", "*.json"])
    assert third.changed and third.commit != first.commit
    remote = sorted(api.list_repo_files("org/d"))
    assert [f for f in remote if f.endswith(".safetensors")] == ["model.safetensors"]
    assert "model.safetensors.index.json" not in remote


def test_local_folder_and_bad_refs(tmp_path):
    folder = fake_model(tmp_path / "m")
    r = resolve_model(folder)
    assert r.is_local and r.path == folder.resolve() and r.revision is None
    with pytest.raises(ModelSourceError, match="not a Hub repo id"):
        resolve_model("./does/not/exist")

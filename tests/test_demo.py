"""``deltahub demo`` in-process: Hub -> upload -> push -> reconstruct (-> serve), asserting what it
prints and what it leaves on its embedded Hub. The tiny models come from the toy_models fixture
(seeded into the demo's model cache), so no test trains them again."""

from __future__ import annotations

import json
import re
import shutil
import socket
import urllib.request

import pytest

from deltahub.demo import ORG, OWNED_ENV, Demo, DemoOptions


def seed_models(root, toy_models, tasks):
    """Put the fixture's models where the demo caches its own, cards naming the demo's base repo."""
    models = root / "models"
    models.mkdir(parents=True)
    shutil.copytree(toy_models["base"], models / "tiny-base")
    for task in tasks:
        dst = models / f"tiny-{task}"
        shutil.copytree(toy_models[task], dst)
        card = (dst / "README.md").read_text()
        (dst / "README.md").write_text(re.sub(r"(?m)^base_model: .*$", f"base_model: {ORG}/tiny-base", card))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, toy_models):
    """One demo run (no serving) over seeded models: (root, printed lines, summary)."""
    import os

    with pytest.MonkeyPatch.context() as mp:
        for k in ("HF_ENDPOINT", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "DELTAHUB_CACHE"):
            mp.delenv(k, raising=False)
        root = tmp_path_factory.mktemp("demo")
        seed_models(root, toy_models, ("upper", "pirate"))
        before = {k: os.environ.get(k) for k in OWNED_ENV}
        lines: list[str] = []
        summary = Demo(DemoOptions(root=root, serve=False), say=lines.append).run()
        assert {k: os.environ.get(k) for k in OWNED_ENV} == before  # the client environment does not leak
        yield root, lines, summary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_demo_push_and_reconstruct(first_run):
    root, lines, summary = first_run
    text = "\n".join(lines)
    for step in ("[1] building", "[2] starting the embedded Hub", "[3] uploading", "[4] deltahub push",
                 "[5] deltahub reconstruct"):
        assert step in text
    hub_url = summary["urls"]["hub"]
    for name in ("tiny-base", "tiny-upper", "tiny-pirate"):
        assert f"{hub_url}/{ORG}/{name}  (new commit" in text
    assert set(summary["deltas"]) == {"upper", "pirate"}
    assert f"base model: {ORG}/tiny-base (from the model card" in text
    for task, url in summary["deltas"].items():
        assert url == f"{hub_url}/{ORG}/tiny-{task}-delta" and url in text
    check = summary["check"]
    assert check["top1_agreement"] >= 0.8
    base_answers = [a[0] for a in check["answers"]]
    assert [a[1] for a in check["answers"]] != base_answers  # the fine-tune answers differently
    assert (root / "reconstructed" / "tiny-upper" / "model.safetensors").is_file()
    assert not list(root.glob("hf-fresh-*"))  # the throw-away cache is gone


def test_demo_second_run_commits_nothing(first_run):
    from huggingface_hub import HfApi

    from deltahub.localhub import LocalHub

    root = first_run[0]
    with LocalHub(root / "hub") as h:  # the delta repos are ordinary repos with deltahub's card
        api = HfApi(endpoint=h.url)
        info = api.model_info(f"{ORG}/tiny-pirate-delta")
        assert info.card_data.base_model == f"{ORG}/tiny-base" and info.card_data.library_name == "deltahub"
        commits = len(api.list_repo_commits(f"{ORG}/tiny-pirate-delta"))
    lines: list[str] = []
    Demo(DemoOptions(root=root, serve=False), say=lines.append).run()
    text = "\n".join(lines)
    assert "new commit" not in text.replace("no new commit", "")
    assert text.count("unchanged, no new commit") == 2 and text.count("already there") == 3
    with LocalHub(root / "hub") as h:
        assert len(HfApi(endpoint=h.url).list_repo_commits(f"{ORG}/tiny-pirate-delta")) == commits


def test_demo_serves_the_deltas(first_run):
    pytest.importorskip("fastapi")
    pytest.importorskip("gradio")
    lines: list[str] = []
    demo = Demo(DemoOptions(root=first_run[0], serve_port=free_port(), ui_port=free_port()), say=lines.append)
    try:
        summary = demo.run(wait=False)
        server, ui = summary["urls"]["server"], summary["urls"]["playground"]
        assert f"deltahub serve: {server}" in "\n".join(lines) and f"playground: {ui}" in "\n".join(lines)
        with urllib.request.urlopen(f"{server}/v1/models", timeout=30) as r:
            ids = {m["id"] for m in json.load(r)["data"]}
        assert {"upper", "pirate"} <= ids
        body = json.dumps({"model": "pirate", "messages": [{"role": "user", "content": "hello world"}],
                           "max_tokens": 12, "temperature": 0}).encode()
        req = urllib.request.Request(f"{server}/v1/chat/completions", data=body,
                                     headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            reply = json.load(r)["choices"][0]["message"]["content"]
        assert reply.strip()
        with urllib.request.urlopen(ui, timeout=30) as r:
            assert r.status == 200
    finally:
        procs = list(demo.procs)
        demo.stop()
    assert all(p.poll() is not None for p in procs)

"""Fixtures for tests that drive the embedded Hub with the real huggingface_hub client.

How to point huggingface_hub at a LocalHub (notes for deltahub/hub.py and its tests)
-----------------------------------------------------------------------------------
huggingface_hub reads its environment ONCE, at import, into ``huggingface_hub.constants``:
``ENDPOINT`` and ``HUGGINGFACE_CO_URL_TEMPLATE`` (from HF_ENDPOINT), ``HF_HOME``/``HF_HUB_CACHE``/
``HF_TOKEN_PATH``/``HF_STORED_TOKENS_PATH`` (from HF_HOME), ``HF_HUB_DISABLE_XET``, ``HF_HUB_OFFLINE``.
Module-level helpers (``huggingface_hub.upload_file``, ``create_repo``, ``model_info``...) go
through ``huggingface_hub.hf_api.api``, an ``HfApi`` whose ``endpoint`` was fixed at import. In a
pytest session something (transformers, another conftest) has usually imported it already, so
setting environment variables in a test is NOT enough. Three ways that work:

1. ``hf_env`` (below): sets the variables (for subprocesses) AND patches those constants and
   ``hf_api.api.endpoint`` for the test, so unmodified library code (``snapshot_download(repo)``,
   ``HfApi()``, ``hf_hub_download``) talks to the local Hub with a fresh HF_HOME. Use it for code
   that cannot take an endpoint argument (deltahub.hub, transformers' from_pretrained).
2. Pass ``endpoint=hub.url`` explicitly: ``HfApi(endpoint=...)``, ``hf_hub_download(...,
   endpoint=...)``, ``snapshot_download(..., endpoint=...)`` all accept it (plus ``cache_dir=``).
3. Run the client in a subprocess with ``env={**os.environ, **hub.client_env(), "HF_HOME": ...}``
   (``client_env()`` gives HF_ENDPOINT and HF_HUB_DISABLE_XET=1): what the CLI tests should do.

HF_HUB_DISABLE_XET=1 is required with huggingface_hub >= 1.0 when hf_xet is installed (it is
here): otherwise uploads go to a Xet CAS service, which the local Hub does not implement.

Tokens of the session server: ``WRITE`` (user alice, write), ``WRITE2`` (carol, write) and
``READ`` (bob, read). Each test makes its own repos (``repo_id`` fixture) so tests stay independent.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Iterator

import pytest

WRITE = "hf_alice_write_token"
WRITE2 = "hf_carol_write_token"
READ = "hf_bob_read_token"
TOKENS = [f"alice:write:{WRITE}", f"carol:write:{WRITE2}", f"bob:read:{READ}"]


@pytest.fixture(scope="session")
def localhub(tmp_path_factory) -> Iterator:
    """A LocalHub on a free port over a fresh root, shared by the whole session."""
    from deltahub.localhub import LocalHub

    with LocalHub(tmp_path_factory.mktemp("localhub-root"), tokens=TOKENS) as hub:
        yield hub


@pytest.fixture(scope="session", autouse=True)
def _no_xet_no_offline() -> Iterator[None]:
    """The client must use the LFS protocol (not Xet) and be online for every test here."""
    from huggingface_hub import constants

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(constants, "HF_HUB_DISABLE_XET", True)
        mp.setattr(constants, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_HUB_DISABLE_XET", "1")
        mp.delenv("HF_HUB_OFFLINE", raising=False)
        mp.delenv("HF_TOKEN", raising=False)
        yield


@pytest.fixture
def hf_env(localhub, tmp_path, monkeypatch):
    """Point huggingface_hub (this process and subprocesses) at ``localhub`` with a fresh HF_HOME.
    Returns the environment dict to pass to subprocesses."""
    from huggingface_hub import constants, hf_api

    home = tmp_path / "hf_home"
    home.mkdir()
    env = {**localhub.client_env(), "HF_HOME": str(home), "HF_HUB_CACHE": str(home / "hub")}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(constants, "ENDPOINT", localhub.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", localhub.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setattr(constants, "HF_HOME", str(home))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(home / "hub"))
    for name, rel in [("HF_TOKEN_PATH", "token"), ("HF_STORED_TOKENS_PATH", "stored_tokens"),
                      ("HF_ASSETS_CACHE", "assets"), ("HF_XET_CACHE", "xet")]:  # fmt: skip
        if hasattr(constants, name):
            monkeypatch.setattr(constants, name, str(home / rel))
    monkeypatch.setattr(hf_api.api, "endpoint", localhub.url)
    return {**os.environ, **env}


@pytest.fixture(scope="session")
def tokens() -> dict[str, str]:
    """The session hub's token secrets: {"write": alice, "write2": carol, "read": bob}."""
    return {"write": WRITE, "write2": WRITE2, "read": READ}


@pytest.fixture
def api(localhub):
    """An HfApi with alice's write token on the session hub."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=localhub.url, token=WRITE)


@pytest.fixture
def repo_id(api, request) -> str:
    """A fresh public model repo owned by alice, named after the test."""
    name = f"{re.sub(r'[^A-Za-z0-9_-]+', '-', request.node.name[:40]).strip('-_')}-{uuid.uuid4().hex[:6]}"
    rid = f"alice/{name}"
    api.create_repo(rid)
    return rid


@pytest.fixture
def cache_dir(tmp_path):
    d = tmp_path / "hf_cache"
    d.mkdir()
    return d

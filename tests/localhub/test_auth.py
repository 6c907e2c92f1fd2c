"""Private and gated repos and token scopes, seen through the client's own exception types."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError, RepositoryNotFoundError


@pytest.fixture
def private_repo(api, request):
    rid = f"alice/private-{request.node.name[-20:].strip('_')}"
    api.create_repo(rid, private=True)
    api.upload_file(path_or_fileobj=b"secret", path_in_repo="s.txt", repo_id=rid)
    yield rid
    api.delete_repo(rid)


def test_private_repo_needs_a_valid_token(localhub, private_repo, tokens, cache_dir):
    anon = HfApi(endpoint=localhub.url, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info(private_repo)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(private_repo, "s.txt", endpoint=localhub.url, cache_dir=cache_dir, token=False)
    with pytest.raises(RepositoryNotFoundError):
        anon.list_repo_files(private_repo)
    assert private_repo not in [m.id for m in anon.list_models(author="alice")]
    # an unknown token is refused outright, as huggingface.co does ("Invalid credentials")
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download(private_repo, "s.txt", endpoint=localhub.url, cache_dir=cache_dir, token="hf_wrong")
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=localhub.url, token="hf_wrong").model_info(private_repo)
    assert e.value.response.status_code == 401
    # any configured token may read; the repo says it is private
    reader = HfApi(endpoint=localhub.url, token=tokens["read"])
    assert reader.model_info(private_repo).private is True
    path = hf_hub_download(
        private_repo, "s.txt", endpoint=localhub.url, cache_dir=cache_dir, token=tokens["read"]
    )
    assert Path(path).read_bytes() == b"secret"
    snap = snapshot_download(private_repo, endpoint=localhub.url, cache_dir=cache_dir, token=tokens["write2"])
    assert Path(snap, "s.txt").read_bytes() == b"secret"


def test_read_token_and_anonymous_cannot_write(localhub, repo_id, tokens):
    reader = HfApi(endpoint=localhub.url, token=tokens["read"])
    anon = HfApi(endpoint=localhub.url, token=False)
    for client, status in ((reader, 403), (anon, 401)):
        with pytest.raises(HfHubHTTPError) as e:
            client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=repo_id)
        assert e.value.response.status_code == status
        with pytest.raises(HfHubHTTPError) as e:
            client.create_repo("bob/new-repo")
        assert e.value.response.status_code == status
        with pytest.raises(HfHubHTTPError) as e:
            client.create_branch(repo_id, branch="b")
        assert e.value.response.status_code == status
        with pytest.raises(HfHubHTTPError) as e:
            client.delete_repo(repo_id)
        assert e.value.response.status_code == status
    assert reader.list_repo_files(repo_id) == [".gitattributes"]  # but they can read public repos
    assert anon.list_repo_files(repo_id) == [".gitattributes"]
    # exist_ok with a read token on an existing repo is fine, like on the Hub
    assert reader.create_repo(repo_id, exist_ok=True).repo_id == repo_id


def test_gated_repo_needs_login_to_download(api, localhub, repo_id, cache_dir, tokens):
    api.upload_file(path_or_fileobj=b"g", path_in_repo="g.txt", repo_id=repo_id)
    api.update_repo_settings(repo_id, gated="auto")
    anon = HfApi(endpoint=localhub.url, token=False)
    assert anon.model_info(repo_id).gated == "auto"  # metadata stays visible
    with pytest.raises(GatedRepoError):
        hf_hub_download(repo_id, "g.txt", endpoint=localhub.url, cache_dir=cache_dir, token=False)
    path = hf_hub_download(repo_id, "g.txt", endpoint=localhub.url, cache_dir=cache_dir, token=tokens["read"])
    assert Path(path).read_bytes() == b"g"

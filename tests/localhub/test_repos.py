"""Repo lifecycle through the real huggingface_hub client: create / duplicate / delete / move,
settings, dataset repos, listing, whoami."""

from __future__ import annotations

import pytest
from huggingface_hub import HfApi
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError


def test_create_duplicate_delete(api, localhub):
    url = api.create_repo("alice/lifecycle")
    assert url == f"{localhub.url}/alice/lifecycle"
    assert url.repo_id == "alice/lifecycle" and url.repo_type == "model"
    with pytest.raises(HfHubHTTPError) as e:
        api.create_repo("alice/lifecycle")
    assert e.value.response.status_code == 409
    assert e.value.response.json()["url"] == f"{localhub.url}/alice/lifecycle"
    assert api.create_repo("alice/lifecycle", exist_ok=True).repo_id == "alice/lifecycle"
    info = api.model_info("alice/lifecycle")
    assert len(info.sha) == 40 and [s.rfilename for s in info.siblings] == [".gitattributes"]
    assert api.repo_exists("alice/lifecycle")
    api.delete_repo("alice/lifecycle")
    assert not api.repo_exists("alice/lifecycle")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/lifecycle")
    with pytest.raises(RepositoryNotFoundError):
        api.delete_repo("alice/lifecycle")
    api.delete_repo("alice/lifecycle", missing_ok=True)
    api.create_repo("alice/lifecycle")  # the name is free again
    api.delete_repo("alice/lifecycle")


def test_namespace_defaults_to_token_user(api):
    url = api.create_repo("no-namespace-given")
    assert url.repo_id == "alice/no-namespace-given"
    api.delete_repo("alice/no-namespace-given")


def test_dataset_repo_is_separate_from_model_repo(api, localhub, tmp_path):
    api.create_repo("alice/shared-name", repo_type="dataset")
    assert api.repo_exists("alice/shared-name", repo_type="dataset")
    assert not api.repo_exists("alice/shared-name")
    (tmp_path / "data.csv").write_text("a,b\n1,2\n")
    rid = "alice/shared-name"
    api.upload_file(
        path_or_fileobj=tmp_path / "data.csv", path_in_repo="data.csv", repo_id=rid, repo_type="dataset"
    )
    info = api.dataset_info("alice/shared-name", files_metadata=True)
    assert {s.rfilename for s in info.siblings} == {".gitattributes", "data.csv"}
    assert api.list_repo_files("alice/shared-name", repo_type="dataset") == [".gitattributes", "data.csv"]
    with pytest.raises(RepositoryNotFoundError):
        api.model_info("alice/shared-name")
    assert any(d.id == "alice/shared-name" for d in api.list_datasets(author="alice"))
    api.delete_repo("alice/shared-name", repo_type="dataset")


def test_invalid_names_are_refused(api):
    for bad in ("alice/..", "alice/a..b", "alice/-x", "api/x"):
        with pytest.raises((HfHubHTTPError, ValueError)):
            api.create_repo(bad)


def test_move_and_settings(api):
    api.create_repo("alice/to-move")
    api.move_repo("alice/to-move", "carol/moved")
    assert not api.repo_exists("alice/to-move") and api.repo_exists("carol/moved")
    api.update_repo_settings("carol/moved", private=True)
    assert api.model_info("carol/moved").private is True
    assert not HfApi(endpoint=api.endpoint, token=False).repo_exists("carol/moved")
    api.update_repo_settings("carol/moved", private=False)
    assert HfApi(endpoint=api.endpoint, token=False).repo_exists("carol/moved")
    api.delete_repo("carol/moved")


def test_list_models_and_whoami(api, localhub, repo_id, tokens):
    ids = [m.id for m in api.list_models(author="alice")]
    assert repo_id in ids
    assert all(i.startswith("alice/") for i in ids)
    me = api.whoami()
    assert me["name"] == "alice" and me["auth"]["accessToken"]["role"] == "write"
    reader = HfApi(endpoint=localhub.url, token=tokens["read"]).whoami()
    assert reader["name"] == "bob" and reader["auth"]["accessToken"]["role"] == "read"
    with pytest.raises(HfHubHTTPError) as e:
        HfApi(endpoint=localhub.url, token="hf_not_a_real_token").whoami()
    assert e.value.response.status_code == 401


def test_open_mode_hub_needs_no_token(tmp_path):
    from deltahub.localhub import LocalHub

    with LocalHub(tmp_path / "root") as hub:
        anon = HfApi(endpoint=hub.url, token=False)
        url = anon.create_repo("team/open")
        anon.upload_file(path_or_fileobj=b"hi", path_in_repo="a.txt", repo_id="team/open")
        assert url.repo_id == "team/open"
        assert anon.list_repo_files("team/open") == [".gitattributes", "a.txt"]
        assert anon.create_repo("mine").repo_id == "local/mine"

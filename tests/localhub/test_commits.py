"""Commits through the real client: upload_file / upload_folder / create_commit with add, delete
and copy operations, parent_commit (a stale parent is refused, concurrent writers lose no update),
unchanged re-uploads make no commit, pull-request refs."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from huggingface_hub import CommitOperationAdd, CommitOperationCopy, CommitOperationDelete
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError


def files_of(api, repo_id, revision=None):
    return set(api.list_repo_files(repo_id, revision=revision)) - {".gitattributes"}


def read(api, repo_id, path, cache_dir, revision=None):
    from huggingface_hub import hf_hub_download

    return Path(
        hf_hub_download(repo_id, path, revision=revision, endpoint=api.endpoint, cache_dir=cache_dir)
    ).read_bytes()


def test_upload_file_and_folder(api, repo_id, tmp_path, cache_dir):
    (tmp_path / "sub" / "deep").mkdir(parents=True)
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.json").write_text('{"b": 1}')
    (tmp_path / "sub" / "deep" / "c.bin").write_bytes(bytes(range(256)) * 8)
    info = api.upload_folder(repo_id=repo_id, folder_path=tmp_path, commit_message="folder")
    assert len(info.oid) == 40 and info.commit_url.endswith(f"/{repo_id}/commit/{info.oid}")
    assert files_of(api, repo_id) == {"a.txt", "sub/b.json", "sub/deep/c.bin"}
    sib = {s.rfilename: s for s in api.model_info(repo_id, files_metadata=True).siblings}
    assert sib["sub/deep/c.bin"].lfs is not None and sib["a.txt"].lfs is None  # binary -> LFS
    one = api.upload_file(path_or_fileobj=b"new", path_in_repo="sub/deep/new.txt", repo_id=repo_id)
    assert api.model_info(repo_id).sha == one.oid
    assert read(api, repo_id, "sub/deep/new.txt", cache_dir) == b"new"
    assert read(api, repo_id, "sub/deep/c.bin", cache_dir) == bytes(range(256)) * 8
    commits = api.list_repo_commits(repo_id)
    assert [c.title for c in commits] == [
        "Upload sub/deep/new.txt with huggingface_hub",
        "folder",
        "initial commit",
    ]
    assert commits[0].commit_id == one.oid and commits[0].authors == ["alice"]


def test_create_commit_add_delete_copy(api, repo_id, cache_dir):
    big = b"\0" + b"L" * 5000  # binary -> LFS
    api.create_commit(
        repo_id,
        [
            CommitOperationAdd("keep.txt", b"keep"),
            CommitOperationAdd("gone.txt", b"gone"),
            CommitOperationAdd("dir/x.txt", b"x"),
            CommitOperationAdd("dir/y.txt", b"y"),
            CommitOperationAdd("weights.bin", big),
        ],
        commit_message="first",
    )
    api.create_commit(
        repo_id,
        [
            CommitOperationDelete("gone.txt"),
            CommitOperationDelete("dir/", is_folder=True),
            CommitOperationCopy("keep.txt", "copies/keep.txt"),
            CommitOperationCopy("weights.bin", "copies/weights.bin"),
            CommitOperationAdd("keep.txt", b"changed"),
        ],
        commit_message="second",
    )
    assert files_of(api, repo_id) == {"keep.txt", "weights.bin", "copies/keep.txt", "copies/weights.bin"}
    assert read(api, repo_id, "keep.txt", cache_dir) == b"changed"
    assert read(api, repo_id, "copies/keep.txt", cache_dir) == b"keep"  # copied before the overwrite
    assert read(api, repo_id, "copies/weights.bin", cache_dir) == big
    meta = {f.path: f for f in api.get_paths_info(repo_id, ["weights.bin", "copies/weights.bin"])}
    assert meta["weights.bin"].lfs.sha256 == meta["copies/weights.bin"].lfs.sha256
    with pytest.raises(EntryNotFoundError):
        api.delete_file("not-there.txt", repo_id=repo_id)
    api.delete_folder("copies", repo_id=repo_id)
    assert files_of(api, repo_id) == {"keep.txt", "weights.bin"}


def test_unchanged_upload_makes_no_commit(api, repo_id, tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x08" * 3000)
    (tmp_path / "config.json").write_text("{}")
    first = api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    again = api.upload_folder(repo_id=repo_id, folder_path=tmp_path)
    assert again.oid == first.oid
    assert len(api.list_repo_commits(repo_id)) == 2
    (tmp_path / "config.json").write_text('{"changed": true}')
    assert api.upload_folder(repo_id=repo_id, folder_path=tmp_path).oid != first.oid


def test_stale_parent_commit_is_refused(api, repo_id):
    head = api.model_info(repo_id).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=repo_id, parent_commit=head)
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=repo_id, parent_commit=head)
    assert e.value.response.status_code == 412
    assert files_of(api, repo_id) == {"one.txt"}


def test_concurrent_commits_with_parent_no_lost_update(api, repo_id):
    """Writers that read the same head and commit with parent_commit=head: exactly one wins each
    round, the others get 412 and retry from the new head; in the end every file is there."""
    n_writers, barrier = 4, threading.Barrier(4)
    results: dict[int, list[int]] = {i: [] for i in range(n_writers)}

    def writer(i: int) -> None:
        attempts = 0
        while True:
            head = api.model_info(repo_id).sha
            if attempts == 0:
                barrier.wait()
            attempts += 1
            try:
                api.create_commit(repo_id, [CommitOperationAdd(f"w{i}.txt", str(i).encode())],
                                  commit_message=f"writer {i}", parent_commit=head)  # fmt: skip
                results[i].append(attempts)
                return
            except HfHubHTTPError as e:
                assert e.response.status_code == 412
                assert attempts < 20

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(len(v) == 1 for v in results.values())
    assert files_of(api, repo_id) == {f"w{i}.txt" for i in range(n_writers)}
    history = api.list_repo_commits(repo_id)
    assert len(history) == n_writers + 1  # one commit per writer, linear history


def test_concurrent_commits_without_parent_all_land(api, repo_id):
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            api.upload_file(path_or_fileobj=str(i).encode(), path_in_repo=f"f{i}.txt", repo_id=repo_id)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert files_of(api, repo_id) == {f"f{i}.txt" for i in range(6)}
    assert len(api.list_repo_commits(repo_id)) == 7


def test_commit_as_pull_request(api, repo_id, cache_dir):
    info = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="p.txt", repo_id=repo_id, create_pr=True)
    assert info.pr_num == 1 and info.pr_revision == "refs/pr/1"
    assert "p.txt" not in files_of(api, repo_id)
    assert "p.txt" in files_of(api, repo_id, revision="refs/pr/1")
    assert read(api, repo_id, "p.txt", cache_dir, revision="refs/pr/1") == b"proposal"
    refs = api.list_repo_refs(repo_id, include_pull_requests=True)
    assert [r.ref for r in refs.pull_requests] == ["refs/pr/1"]

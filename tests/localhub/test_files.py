"""Reading through the real client: LFS files over 10 MB, downloads by branch / tag / commit /
revision, snapshot_download, list_repo_tree (recursive, paginated), get_paths_info, model_info
with files_metadata, refs and branches, and the raw resolve headers and Range requests."""

from __future__ import annotations

import base64
import hashlib
import os
from pathlib import Path

import httpx
import pytest
from huggingface_hub import CommitOperationAdd, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.hf_api import RepoFile, RepoFolder


def test_lfs_file_over_10mb_roundtrip(api, repo_id, tmp_path, cache_dir):
    data = base64.b64encode(os.urandom(9 * 1024 * 1024 + 17))  # 12 MB of text: LFS by size alone
    (tmp_path / "big.dat").write_bytes(data)
    api.upload_file(path_or_fileobj=tmp_path / "big.dat", path_in_repo="big.dat", repo_id=repo_id)
    (big,) = [s for s in api.model_info(repo_id, files_metadata=True).siblings if s.rfilename == "big.dat"]
    sha = hashlib.sha256(data).hexdigest()
    assert big.size == len(data) and big.lfs.size == len(data) and big.lfs.sha256 == sha
    path = hf_hub_download(repo_id, "big.dat", endpoint=api.endpoint, cache_dir=cache_dir)
    assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == sha
    # the blob is cached under its sha256, like files from huggingface.co
    assert os.path.basename(os.path.realpath(path)) == sha


def test_downloads_by_branch_tag_and_commit(api, repo_id, cache_dir):
    v1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="f.txt", repo_id=repo_id).oid
    api.create_tag(repo_id, tag="v1.0", revision=v1)
    api.create_branch(repo_id, branch="dev", revision=v1)
    api.upload_file(path_or_fileobj=b"v2", path_in_repo="f.txt", repo_id=repo_id)
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="f.txt", repo_id=repo_id, revision="dev")

    def get(rev):
        p = hf_hub_download(repo_id, "f.txt", revision=rev, endpoint=api.endpoint, cache_dir=cache_dir)
        return open(p, "rb").read()

    assert [get(r) for r in (None, "main", v1, "v1.0", "dev")] == [b"v2", b"v2", b"v1", b"v1", b"dev"]
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [(t.name, t.target_commit) for t in refs.tags] == [("v1.0", v1)]
    assert api.model_info(repo_id, revision="v1.0").sha == v1
    with pytest.raises(RevisionNotFoundError):
        get("no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.model_info(repo_id, revision="0" * 40)
    api.delete_branch(repo_id, branch="dev")
    api.delete_tag(repo_id, tag="v1.0")
    assert [b.name for b in api.list_repo_refs(repo_id).branches] == ["main"]


def test_snapshot_download_by_revision(api, repo_id, tmp_path, cache_dir):
    ops = [CommitOperationAdd("a.txt", b"a"), CommitOperationAdd("d/b.txt", b"b")]
    first = api.create_commit(repo_id, ops, commit_message="1").oid
    api.create_commit(repo_id, [CommitOperationAdd("c.txt", b"c")], commit_message="2")
    old = snapshot_download(repo_id, revision=first, endpoint=api.endpoint, cache_dir=cache_dir)
    new = snapshot_download(repo_id, endpoint=api.endpoint, cache_dir=cache_dir)
    assert os.path.basename(old) == first
    assert not os.path.exists(os.path.join(old, "c.txt")) and Path(new, "c.txt").read_text() == "c"
    assert Path(old, "d", "b.txt").read_text() == "b"
    local = snapshot_download(
        repo_id, endpoint=api.endpoint, local_dir=tmp_path / "local", allow_patterns=["d/*"]
    )
    assert sorted(os.listdir(os.path.join(local, "d"))) == ["b.txt"]
    assert not os.path.exists(os.path.join(local, "a.txt"))


def test_missing_file_and_repo_errors(api, repo_id, cache_dir):
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.txt", endpoint=api.endpoint, cache_dir=cache_dir)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("alice/does-not-exist", "x.txt", endpoint=api.endpoint, cache_dir=cache_dir)
    assert not api.file_exists(repo_id, "missing.txt")
    assert api.file_exists(repo_id, ".gitattributes")


def test_tree_paths_info_and_pagination(api, repo_id):
    ops = [CommitOperationAdd(f"many/f{i:04d}.txt", str(i).encode()) for i in range(1100)]
    ops += [CommitOperationAdd("top.txt", b"top"), CommitOperationAdd("nested/a/b.txt", b"b")]
    api.create_commit(repo_id, ops, commit_message="lots of files")
    api.upload_file(path_or_fileobj=b"later", path_in_repo="nested/late.txt", repo_id=repo_id)
    files = api.list_repo_files(repo_id)  # recursive, > 1000 entries: several pages
    assert len(files) == 1104 and "many/f1099.txt" in files and "nested/a/b.txt" in files
    top = {e.path: type(e) for e in api.list_repo_tree(repo_id)}
    assert top == {"many": RepoFolder, "nested": RepoFolder, "top.txt": RepoFile, ".gitattributes": RepoFile}
    nested = sorted(e.path for e in api.list_repo_tree(repo_id, "nested", recursive=True))
    assert nested == ["nested/a", "nested/a/b.txt", "nested/late.txt"]
    with pytest.raises(EntryNotFoundError):
        list(api.list_repo_tree(repo_id, "no-such-dir"))
    info = {e.path: e for e in api.get_paths_info(repo_id, ["top.txt", "nested", "absent"], expand=True)}
    assert set(info) == {"top.txt", "nested"}
    assert isinstance(info["nested"], RepoFolder) and info["top.txt"].size == 3
    assert info["top.txt"].last_commit.title == "lots of files"
    assert info["nested"].last_commit.title.startswith("Upload nested/late.txt")


def test_resolve_headers_and_ranges(api, repo_id, tokens):
    small = b"0123456789" * 10
    big = b"\0" + os.urandom(4096)
    head = api.create_commit(repo_id, [CommitOperationAdd("s.txt", small), CommitOperationAdd("w.bin", big)],
                             commit_message="c").oid  # fmt: skip
    base = f"{api.endpoint}/{repo_id}/resolve/main"
    with httpx.Client() as c:
        r = c.head(f"{base}/s.txt")
        assert r.status_code == 200 and r.headers["X-Repo-Commit"] == head
        assert (
            r.headers["Content-Length"] == "100"
            and r.headers["ETag"].strip('"') == api.get_paths_info(repo_id, "s.txt")[0].blob_id
        )
        r = c.head(f"{base}/w.bin")
        sha = hashlib.sha256(big).hexdigest()
        assert r.headers["X-Linked-Etag"] == f'"{sha}"' and r.headers["X-Linked-Size"] == str(len(big))
        r = c.get(f"{base}/s.txt", headers={"Range": "bytes=10-19"})
        assert r.status_code == 206 and r.content == small[10:20]
        assert r.headers["Content-Range"] == "bytes 10-19/100"
        assert c.get(f"{base}/s.txt", headers={"Range": "bytes=95-"}).content == small[95:]
        assert c.get(f"{base}/w.bin", headers={"Range": "bytes=-5"}).content == big[-5:]
        r = c.get(f"{base}/s.txt", headers={"Range": "bytes=500-"})
        assert r.status_code == 416 and r.headers["Content-Range"] == "bytes */100"
        r = c.head(f"{base}/missing")
        assert r.status_code == 404 and r.headers["X-Error-Code"] == "EntryNotFound"
        assert r.headers["X-Repo-Commit"] == head
        r = c.get(f"{api.endpoint}/{repo_id}/resolve/nope/s.txt")
        assert r.status_code == 404 and r.headers["X-Error-Code"] == "RevisionNotFound"


def test_hf_env_fixture_points_plain_client_code_at_the_hub(hf_env, tokens):
    """Library code that takes no endpoint (module-level helpers, HfApi()) uses the local Hub."""
    import huggingface_hub as hh

    hh.create_repo("alice/plain-client", token=tokens["write"])
    hh.upload_file(
        path_or_fileobj=b"p", path_in_repo="p.txt", repo_id="alice/plain-client", token=tokens["write"]
    )
    snap = snapshot_download("alice/plain-client")
    assert Path(snap, "p.txt").read_bytes() == b"p"
    assert snap.startswith(hf_env["HF_HOME"])
    assert hh.HfApi().model_info("alice/plain-client").sha == Path(snap).name
    hh.delete_repo("alice/plain-client", token=tokens["write"])

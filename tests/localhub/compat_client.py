"""Drives a LocalHub with whatever huggingface_hub is importable (run by test_compat.py in a
subprocess with PYTHONPATH pointing at huggingface_hub 0.36). Configured only through the
environment, as a user would: HF_ENDPOINT, HF_HOME, HF_HUB_DISABLE_XET=1; tokens in argv.
Exits non-zero (an assertion or the client's own exception) on any incompatibility."""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
from pathlib import Path

import huggingface_hub
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationCopy,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.utils import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


def expect(exc_type, fn, *args, status=None, **kwargs):
    try:
        fn(*args, **kwargs)
    except exc_type as e:
        if status is not None:
            assert e.response.status_code == status, (e.response.status_code, status)
        return
    raise AssertionError(f"{fn.__name__} did not raise {exc_type.__name__}")


def main(write: str, read: str) -> None:
    api, anon, reader = HfApi(token=write), HfApi(token=False), HfApi(token=read)
    assert api.endpoint == os.environ["HF_ENDPOINT"]
    assert api.whoami()["name"] == "alice"
    rid = "alice/compat-" + huggingface_hub.__version__.replace(".", "-")
    api.create_repo(rid)
    expect(HfHubHTTPError, api.create_repo, rid, status=409)
    api.create_repo(rid, exist_ok=True)

    work = Path(tempfile.mkdtemp())
    (work / "sub").mkdir()
    (work / "README.md").write_text("---\nlicense: apache-2.0\ntags: [x]\n---\n# card\n")
    (work / "sub" / "a.txt").write_text("alpha")
    big = os.urandom(11 * 1024 * 1024)
    (work / "big.bin").write_bytes(big)
    first = api.upload_folder(repo_id=rid, folder_path=work, commit_message="upload").oid
    assert api.upload_folder(repo_id=rid, folder_path=work).oid == first  # nothing changed: no commit

    info = api.model_info(rid, files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    assert info.sha == first and info.card_data.license == "apache-2.0"
    assert sib["big.bin"].lfs.sha256 == hashlib.sha256(big).hexdigest() and sib["big.bin"].size == len(big)
    assert sib["sub/a.txt"].lfs is None and sib["sub/a.txt"].size == 5

    api.create_commit(
        rid,
        [
            CommitOperationCopy("big.bin", "copy/big.bin"),
            CommitOperationCopy("sub/a.txt", "copy/a.txt"),
            CommitOperationDelete("sub/"),
            CommitOperationAdd("new.txt", b"new"),
        ],
        commit_message="ops",
    )
    files = set(api.list_repo_files(rid))
    assert files == {".gitattributes", "README.md", "big.bin", "copy/big.bin", "copy/a.txt", "new.txt"}, files
    tree = {e.path for e in api.list_repo_tree(rid, recursive=True)}
    assert "copy" in tree and "copy/big.bin" in tree
    (p,) = api.get_paths_info(rid, ["copy/big.bin"])
    assert p.lfs.sha256 == hashlib.sha256(big).hexdigest()

    path = hf_hub_download(rid, "copy/big.bin")
    assert hashlib.sha256(Path(path).read_bytes()).digest() == hashlib.sha256(big).digest()
    old = hf_hub_download(rid, "sub/a.txt", revision=first)
    assert Path(old).read_text() == "alpha"
    expect(EntryNotFoundError, hf_hub_download, rid, "sub/a.txt")  # deleted on main
    expect(RevisionNotFoundError, hf_hub_download, rid, "new.txt", revision="nope")
    snap = snapshot_download(rid, revision=first)
    assert Path(snap, "sub", "a.txt").read_text() == "alpha" and not Path(snap, "new.txt").exists()

    api.create_branch(rid, branch="dev", revision=first)
    api.create_tag(rid, tag="v1", revision=first)
    refs = api.list_repo_refs(rid)
    assert {b.name for b in refs.branches} == {"main", "dev"} and [t.name for t in refs.tags] == ["v1"]
    assert Path(hf_hub_download(rid, "sub/a.txt", revision="dev")).read_text() == "alpha"
    assert [c.title for c in api.list_repo_commits(rid)][:2] == ["ops", "upload"]

    head = api.model_info(rid).sha
    api.upload_file(path_or_fileobj=b"1", path_in_repo="one.txt", repo_id=rid, parent_commit=head)
    expect(HfHubHTTPError, api.upload_file, path_or_fileobj=b"2", path_in_repo="two.txt", repo_id=rid,
           parent_commit=head, status=412)  # fmt: skip

    prv = rid + "-private"
    api.create_repo(prv, private=True)
    api.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id=prv)
    expect(RepositoryNotFoundError, anon.model_info, prv)
    expect(RepositoryNotFoundError, hf_hub_download, prv, "s.txt", token=False)
    assert Path(hf_hub_download(prv, "s.txt", token=read)).read_bytes() == b"s"
    expect(
        HfHubHTTPError, reader.upload_file, path_or_fileobj=b"x", path_in_repo="x", repo_id=prv, status=403
    )

    ds = rid + "-data"
    api.create_repo(ds, repo_type="dataset")
    api.upload_file(path_or_fileobj=b"a,b\n", path_in_repo="d.csv", repo_id=ds, repo_type="dataset")
    assert Path(hf_hub_download(ds, "d.csv", repo_type="dataset")).read_bytes() == b"a,b\n"

    for r, t in ((rid, None), (prv, None), (ds, "dataset")):
        api.delete_repo(r, repo_type=t)
    expect(RepositoryNotFoundError, api.model_info, rid)
    print("OK", huggingface_hub.__version__)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

"""Publishing a checkpoint to a Hub repo (the local Hub of tests/hub_server.py, through huggingface_hub's
real client): the preflight, shards pre-uploaded as they close, one commit with the manifest, the
parent check between two publishers, and a republish that sends no bytes again."""

from __future__ import annotations

import hashlib
import json
import traceback
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download
from safetensors.torch import load_file, save_file

from rayquant.storage.hub_files import HubAccessDenied, list_hub_files, read_hub_range, resolve_hub_revision
from rayquant.storage.hub_sink import HubOutputConflict, HubSink
from tests.hub_server import HubServer

SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
SMALL_FILES = ["config.json", "README.md"]
WRONG_TOKEN = "hf_notTheServersTokenButASecret42"


def write_checkpoint(folder: Path, fingerprint: str, seed: int = 0) -> dict[str, str]:
    """Two shards, config.json, a model card and the manifest in folder; returns every file's sha256."""
    torch.manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i, shard in enumerate(SHARDS):
        save_file({f"model.layers.{i}.qweight": torch.randint(-2**31, 2**31 - 1, (8, 32), dtype=torch.int32),
                   f"model.layers.{i}.scales": torch.randn(1, 32).half()}, folder / shard)
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"bits": 4}}))
    (folder / "README.md").write_text("---\nlibrary_name: transformers\ntags: [gptq]\n---\n# A quantized model\n")
    sha256 = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in [*SHARDS, *SMALL_FILES]}
    files = [{"path": name, "sha256": digest, "size": (folder / name).stat().st_size}
             for name, digest in sha256.items()]
    (folder / "rayquant-manifest.json").write_text(json.dumps({"job_fingerprint": fingerprint, "files": files}))
    return sha256


def upload_and_publish(sink: HubSink, folder: Path, sha256: dict[str, str]) -> None:
    for shard in SHARDS:
        sink.upload_file(folder / shard, shard, sha256[shard])
    sink.publish(folder, [*SHARDS, *SMALL_FILES])


@pytest.fixture
def repo_uri(hub_env: HubServer) -> str:
    return f"hf://rayquant-tests/out-{uuid.uuid4().hex[:8]}@quantized"


def test_check_writable_creates_a_private_repo_and_the_branch(hub_env, repo_uri):
    sink = HubSink(repo_uri)
    assert (sink.repo_id, sink.branch) == (repo_uri[5:].split("@")[0], "quantized")
    assert sink.published_manifest() is None  # no repo yet
    sink.check_writable()
    assert HfApi(endpoint=hub_env.endpoint).model_info(sink.repo_id).private is True
    assert resolve_hub_revision(sink.repo_id, "quantized") == resolve_hub_revision(sink.repo_id, "main")
    sink.check_writable()  # again: repo and branch exist, nothing changes
    assert sink.published_manifest() is None


def test_publish_makes_one_commit_and_the_manifest_appears_only_with_it(hub_env, repo_uri, tmp_path):
    folder = tmp_path / "out"
    sha256 = write_checkpoint(folder, "a" * 64)
    sink = HubSink(repo_uri)
    sink.check_writable()
    head = resolve_hub_revision(sink.repo_id, sink.branch)
    puts = hub_env.lfs_puts
    for shard in SHARDS:
        sink.upload_file(folder / shard, shard, sha256[shard])
    assert hub_env.lfs_puts == puts + 2  # the shards' bytes went up as they closed...
    assert sink.published_manifest() is None  # ...but nothing is in the repo before the commit
    assert resolve_hub_revision(sink.repo_id, sink.branch) == head

    commits = _count_commits(hub_env)
    sink.publish(folder, [*SHARDS, *SMALL_FILES])
    assert _count_commits(hub_env) == commits + 1
    new_head = resolve_hub_revision(sink.repo_id, sink.branch)
    files = list_hub_files(sink.repo_id, new_head)
    for name in [*SHARDS, *SMALL_FILES, "rayquant-manifest.json"]:
        local = (folder / name).read_bytes()
        assert files[name] == len(local)
        assert read_hub_range(sink.repo_id, new_head, name, 0, len(local)) == local
    assert sink.published_manifest() == json.loads((folder / "rayquant-manifest.json").read_text())
    assert hub_env.lfs_puts == puts + 2  # publish reused the pre-uploaded shards


def test_published_files_load_with_the_hubs_own_downloader(hub_env, repo_uri, tmp_path):
    folder = tmp_path / "out"
    sink = HubSink(repo_uri)
    sink.check_writable()
    upload_and_publish(sink, folder, write_checkpoint(folder, "b" * 64))
    siblings = {s.rfilename: s for s in HfApi(endpoint=hub_env.endpoint).model_info(
        sink.repo_id, revision=sink.branch, files_metadata=True).siblings}
    assert siblings[SHARDS[0]].lfs is not None and siblings["config.json"].lfs is None  # the client's choice
    path = hf_hub_download(sink.repo_id, SHARDS[1], revision=sink.branch, cache_dir=tmp_path / "cache",
                           endpoint=hub_env.endpoint)
    expected = load_file(folder / SHARDS[1])
    loaded = load_file(path)
    assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in expected)


def test_a_later_publisher_of_another_job_conflicts(hub_env, repo_uri, tmp_path):
    first, second = HubSink(repo_uri), HubSink(repo_uri)
    first.check_writable()
    second.check_writable()  # both saw the same head
    upload_and_publish(first, tmp_path / "first", write_checkpoint(tmp_path / "first", "1" * 64, seed=1))
    with pytest.raises(HubOutputConflict, match="another job") as err:
        upload_and_publish(second, tmp_path / "second", write_checkpoint(tmp_path / "second", "2" * 64, seed=2))
    assert "output.uri" in str(err.value)
    assert first.published_manifest()["job_fingerprint"] == "1" * 64

    third = HubSink(repo_uri)  # starts after the first published: refused before committing
    third.check_writable()
    with pytest.raises(HubOutputConflict, match="another job"):
        upload_and_publish(third, tmp_path / "second", write_checkpoint(tmp_path / "second", "2" * 64, seed=2))
    assert first.published_manifest()["job_fingerprint"] == "1" * 64


def test_a_concurrent_publisher_of_the_same_job_is_fine(hub_env, repo_uri, tmp_path):
    first, second = HubSink(repo_uri), HubSink(repo_uri)
    first.check_writable()
    second.check_writable()
    sha256 = write_checkpoint(tmp_path / "first", "3" * 64, seed=3)
    upload_and_publish(first, tmp_path / "first", sha256)
    head = resolve_hub_revision(first.repo_id, first.branch)
    other_bytes = write_checkpoint(tmp_path / "second", "3" * 64, seed=4)  # same job: only the parent check fails
    upload_and_publish(second, tmp_path / "second", other_bytes)
    assert resolve_hub_revision(first.repo_id, first.branch) == head  # the first one's commit stands


def test_republishing_the_same_model_sends_no_bytes_and_no_commit(hub_env, repo_uri, tmp_path):
    folder = tmp_path / "out"
    sha256 = write_checkpoint(folder, "4" * 64)
    first = HubSink(repo_uri)
    first.check_writable()
    upload_and_publish(first, folder, sha256)
    head, puts, commits = resolve_hub_revision(first.repo_id, first.branch), hub_env.lfs_puts, _count_commits(hub_env)

    again = HubSink(repo_uri)  # a rerun of the same job
    again.check_writable()
    upload_and_publish(again, folder, sha256)
    assert hub_env.lfs_puts == puts
    assert _count_commits(hub_env) == commits
    assert resolve_hub_revision(first.repo_id, first.branch) == head


def test_check_writable_without_a_token_names_hf_token(hub_env, repo_uri, monkeypatch):
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(HubAccessDenied, match="set HF_TOKEN"):
        HubSink(repo_uri).check_writable()


def test_check_writable_with_a_rejected_token_never_shows_it(hub_env, repo_uri, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    with pytest.raises(HubAccessDenied) as err:
        HubSink(repo_uri).check_writable()
    assert "HF_TOKEN" in str(err.value)
    assert WRONG_TOKEN not in "".join(traceback.format_exception(err.value))


def test_upload_before_check_writable_is_a_bug(hub_env, repo_uri, tmp_path):
    with pytest.raises(RuntimeError, match="check_writable"):
        HubSink(repo_uri).upload_file(tmp_path / "x", "x", "0" * 64)


def _count_commits(hub: HubServer) -> int:
    return sum(1 for method, path in hub.requests if method == "POST" and "/commit/" in path)

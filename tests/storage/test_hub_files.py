"""Reading a model from a Hub repo (the local Hub of tests/hub_server.py, through huggingface_hub's real
client): revisions pinned to commits, file listings, small files, ranged reads of a safetensors file,
and the typed errors for an unknown repo or revision, a rejected token and a Hub that does not answer."""

from __future__ import annotations

import json
import struct
import traceback
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import CommitOperationAdd, HfApi
from safetensors.torch import save_file

from rayquant.storage.hub_files import (
    HubAccessDenied,
    HubFileNotFound,
    HubRepoNotFound,
    HubRevisionNotFound,
    HubUnreachable,
    download_hub_file,
    list_hub_files,
    parse_hub_uri,
    read_hub_range,
    resolve_hub_revision,
)
from tests.hub_server import HubServer
from tests.s3_server import free_port

WRONG_TOKEN = "hf_notTheServersTokenButASecret42"


def write_model(folder: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(64, 16, dtype=torch.bfloat16),
               "model.layers.0.mlp.down_proj.weight": torch.randn(16, 48),
               "model.norm.weight": torch.ones(16, dtype=torch.float16)}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 16}))
    return tensors


def push_model(hub: HubServer, folder: Path) -> tuple[str, str]:
    """A new repo holding folder's files, committed with huggingface_hub directly; returns (repo id, commit)."""
    repo_id = f"rayquant-tests/source-{uuid.uuid4().hex[:8]}"
    api = HfApi(endpoint=hub.endpoint)
    api.create_repo(repo_id, private=True)
    operations = [CommitOperationAdd(path.name, path) for path in sorted(folder.iterdir())]
    return repo_id, api.create_commit(repo_id, operations, commit_message="model").oid


@pytest.fixture
def model(hub_env: HubServer, tmp_path: Path) -> tuple[str, str, Path, dict[str, torch.Tensor]]:
    folder = tmp_path / "model"
    tensors = write_model(folder)
    repo_id, commit = push_model(hub_env, folder)
    return repo_id, commit, folder, tensors


def test_parse_hub_uri_splits_repo_and_revision():
    assert parse_hub_uri("hf://org/name@v1.0") == ("org/name", "v1.0")
    assert parse_hub_uri("hf://org/name@refs/pr/3") == ("org/name", "refs/pr/3")
    assert parse_hub_uri("hf://org/name") == ("org/name", None)
    for bad in ("hf://name", "hf://org/name/extra", "hf://org/name@", "s3://org/name", "hf://org/na--me", "org/name"):
        with pytest.raises(ValueError):
            parse_hub_uri(bad)


def test_a_branch_resolves_to_the_commit_that_holds_the_files(model):
    repo_id, commit, _, _ = model
    assert len(commit) == 40 and int(commit, 16) >= 0
    assert resolve_hub_revision(repo_id, None) == commit
    assert resolve_hub_revision(repo_id, "main") == commit
    assert resolve_hub_revision(repo_id, commit) == commit


def test_lists_every_file_with_its_size(model):
    repo_id, commit, folder, _ = model
    files = list_hub_files(repo_id, commit)
    assert {name: size for name, size in files.items() if name != ".gitattributes"} == {
        "config.json": (folder / "config.json").stat().st_size,
        "model.safetensors": (folder / "model.safetensors").stat().st_size}


def test_downloads_config_json_into_the_folder(model, tmp_path):
    repo_id, commit, folder, _ = model
    dest = tmp_path / "cache" / commit
    dest.mkdir(parents=True)
    path = download_hub_file(repo_id, commit, "config.json", dest)
    assert path == dest / "config.json"
    assert path.read_bytes() == (folder / "config.json").read_bytes()
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"]  # no temporary file left behind
    with pytest.raises(ValueError):
        download_hub_file(repo_id, commit, "../config.json", dest)
    with pytest.raises(HubFileNotFound, match="tokenizer.json"):
        download_hub_file(repo_id, commit, "tokenizer.json", dest)


def test_ranged_reads_return_the_local_bytes_one_request_each(model, hub_env):
    repo_id, commit, folder, tensors = model
    local = (folder / "model.safetensors").read_bytes()
    (header_len,) = struct.unpack("<Q", read_hub_range(repo_id, commit, "model.safetensors", 0, 8))
    header = json.loads(read_hub_range(repo_id, commit, "model.safetensors", 8, 8 + header_len))
    for name, tensor in tensors.items():
        start, end = (8 + header_len + offset for offset in header[name]["data_offsets"])
        before = len(hub_env.requests)
        data = read_hub_range(repo_id, commit, "model.safetensors", start, end)
        resolves = [path for _, path in hub_env.requests[before:] if "/resolve/" in path]
        assert resolves == [f"/{repo_id}/resolve/{commit}/model.safetensors"]
        assert data == local[start:end]
        assert torch.equal(torch.frombuffer(bytearray(data), dtype=tensor.dtype).reshape(tensor.shape), tensor)
    assert read_hub_range(repo_id, commit, "model.safetensors", 5, 5) == b""


def test_lfs_reads_follow_the_redirect_without_sending_the_token(model, hub_env):
    repo_id, commit, folder, _ = model
    before = len(hub_env.requests)
    assert read_hub_range(repo_id, commit, "model.safetensors", 100, 300) == \
        (folder / "model.safetensors").read_bytes()[100:300]
    assert any(path.startswith("/lfs/") for _, path in hub_env.requests[before:])  # served by the storage origin
    assert hub_env.storage_auth_headers == 0  # which answers 400 to a request that carries the token


def test_a_body_cut_short_is_read_again(model, hub_env):
    repo_id, commit, folder, _ = model
    local = (folder / "model.safetensors").read_bytes()
    hub_env.short_bodies = 1
    assert read_hub_range(repo_id, commit, "model.safetensors", 0, 1000) == local[:1000]
    hub_env.short_bodies = 100
    try:
        with pytest.raises(HubUnreachable, match=r"got 500 bytes, 3 times"):
            read_hub_range(repo_id, commit, "model.safetensors", 0, 1000)
    finally:
        hub_env.short_bodies = 0


def test_a_dropped_connection_is_read_again(model, hub_env):
    repo_id, commit, folder, _ = model
    local = (folder / "model.safetensors").read_bytes()
    hub_env.cut_bodies = 1
    assert read_hub_range(repo_id, commit, "model.safetensors", 200, 1200) == local[200:1200]
    hub_env.cut_bodies = 100
    try:
        with pytest.raises(HubUnreachable, match="HF_ENDPOINT"):
            read_hub_range(repo_id, commit, "model.safetensors", 200, 1200)
    finally:
        hub_env.cut_bodies = 0


def test_unknown_repo_names_the_repo_and_hf_token(hub_env):
    with pytest.raises(HubRepoNotFound) as err:
        resolve_hub_revision("rayquant-tests/no-such-model", "main")
    message = str(err.value)
    assert "rayquant-tests/no-such-model" in message and "HF_TOKEN" in message and "model.source" in message


def test_unknown_revision_names_the_revision(model):
    repo_id, commit, _, _ = model
    with pytest.raises(HubRevisionNotFound, match="'no-such-branch'"):
        resolve_hub_revision(repo_id, "no-such-branch")
    with pytest.raises(HubRevisionNotFound):
        list_hub_files(repo_id, "0" * 40)


def test_rejected_token_names_hf_token_but_never_its_value(model, monkeypatch):
    repo_id, commit, _, _ = model
    monkeypatch.setenv("HF_TOKEN", WRONG_TOKEN)
    for read in (lambda: resolve_hub_revision(repo_id, "main"),
                 lambda: read_hub_range(repo_id, commit, "model.safetensors", 0, 8)):
        with pytest.raises(HubAccessDenied) as err:
            read()
        assert "HF_TOKEN" in str(err.value)
        assert WRONG_TOKEN not in "".join(traceback.format_exception(err.value))  # nor in the chained errors


def test_down_endpoint_names_hf_endpoint(hub_env, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    with pytest.raises(HubUnreachable, match="HF_ENDPOINT"):
        resolve_hub_revision("org/model", "main")
    with pytest.raises(HubUnreachable, match="HF_ENDPOINT"):
        read_hub_range("org/model", "0" * 40, "model.safetensors", 0, 8)

"""Opening a model in S3 (real SeaweedFS): small files cached, headers by ranged reads, tensors stay remote."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rayquant.storage.model_source import InvalidModelFiles, ModelNotFound, open_model_source, read_source_tensor
from rayquant.storage.remote_ranges import hub_location, parse_hub_location
from rayquant.storage.safetensors_reader import CorruptSafetensors


def _model_dir(tmp_path: Path) -> Path:
    """Two shards + index + config + a tokenizer file, written with safetensors' own writer."""
    g = torch.Generator().manual_seed(0)
    src = tmp_path / "model"
    src.mkdir()
    a = {"model.embed_tokens.weight": torch.randn(16, 8, generator=g, dtype=torch.float32).bfloat16()}
    b = {"model.layers.0.mlp.up_proj.weight": torch.randn(12, 8, generator=g), "lm_head.weight": torch.randn(16, 8)}
    save_file(a, src / "model-00001-of-00002.safetensors")
    save_file(b, src / "model-00002-of-00002.safetensors")
    weight_map = {**{k: "model-00001-of-00002.safetensors" for k in a}, **{k: "model-00002-of-00002.safetensors" for k in b}}
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (src / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    (src / "tokenizer_config.json").write_text("{}")
    return src


def _upload(s3, src: Path, bucket: str, prefix: str) -> str:
    s3.create_bucket(bucket)
    for path in src.iterdir():
        s3.client().upload_file(str(path), bucket, f"{prefix}/{path.name}")
    return f"s3://{bucket}/{prefix}"


def test_s3_model_reads_the_same_tensors_as_the_local_copy(s3_env, tmp_path):
    src = _model_dir(tmp_path)
    uri = _upload(s3_env, src, "remote-model", "tiny")
    local, remote = open_model_source(str(src)), open_model_source(uri)
    assert remote.config == local.config
    assert sorted(p.name for p in remote.path.iterdir()) == ["config.json", "model.safetensors.index.json",
                                                              "tokenizer_config.json"]  # no weights copied
    assert remote.tensors.keys() == local.tensors.keys()
    for name in local.tensors:
        assert remote.tensors[name].file == f"{uri}/{local.tensors[name].file.name}"
        assert torch.equal(read_source_tensor(remote, name), read_source_tensor(local, name))
    assert open_model_source(uri).revision == remote.revision  # stable while the objects are
    s3_env.client().upload_file(str(src / "config.json"), "remote-model", "tiny/generation_config.json")
    assert open_model_source(uri).revision != remote.revision  # any object changed: another revision


def test_s3_model_errors_name_the_problem(s3_env, tmp_path):
    src = _model_dir(tmp_path)
    with pytest.raises(ModelNotFound, match="config.json"):
        open_model_source(_upload(s3_env, src, "remote-model", "empty-prefix-nothing-here") + "-none")
    (src / "model-00002-of-00002.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(CorruptSafetensors, match="model-00002-of-00002"):
        open_model_source(_upload(s3_env, src, "remote-model", "corrupt"))
    index = json.loads((src / "model.safetensors.index.json").read_text())
    index["weight_map"]["lm_head.weight"] = "../other/model.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(InvalidModelFiles, match="outside the model directory"):
        open_model_source(_upload(s3_env, src, "remote-model", "escaping"))


def test_hub_locations_round_trip():
    location = hub_location("org/name", "a" * 40, "dir/model.safetensors")
    where = parse_hub_location(location)
    assert (where.repo_id, where.sha, where.path) == ("org/name", "a" * 40, "dir/model.safetensors")
    with pytest.raises(ValueError):
        parse_hub_location("hf://org/name/model.safetensors")

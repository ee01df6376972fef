import json
import pathlib
import pickle
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayquant.storage.model_source import (
    AUX_FILES,
    InvalidModelFiles,
    ModelNotFound,
    TensorNotFound,
    UnsupportedModelSource,
    default_cache_dir,
    list_aux_files,
    open_model_source,
    read_source_tensor,
)
from rayquant.storage.safetensors_reader import CorruptSafetensors
from rayquant.storage.synthetic import SYNTHETIC_FORMAT


def _all_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


@pytest.fixture
def llama_copy(llama_tiny_dir: Path, tmp_path: Path) -> Path:
    """A private copy of synthetic://llama-tiny that a test may damage."""
    return Path(shutil.copytree(llama_tiny_dir, tmp_path / "llama-tiny"))


def test_synthetic_source_indexes_every_tensor_and_reads_its_values(llama_tiny_dir: Path, synthetic_dir: Path):
    source = open_model_source("synthetic://llama-tiny", cache_dir=synthetic_dir)
    assert source.path == llama_tiny_dir
    weight_map = json.loads((llama_tiny_dir / "model.safetensors.index.json").read_text())["weight_map"]
    assert set(source.tensors) == set(weight_map)
    assert {name: info.file.name for name, info in source.tensors.items()} == weight_map
    assert source.config["model_type"] == "llama" and source.config["num_hidden_layers"] == 4
    expected = _all_weights(llama_tiny_dir)
    for name in ("model.embed_tokens.weight", "model.layers.3.mlp.down_proj.weight", "lm_head.weight"):
        tensor = read_source_tensor(source, name)
        assert tensor.dtype == torch.bfloat16
        assert torch.equal(tensor, expected[name])


def test_synthetic_source_uses_rayquant_cache_env_by_default(
    llama_tiny_dir: Path, synthetic_cache: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("RAYQUANT_CACHE", str(synthetic_cache))
    assert default_cache_dir() == synthetic_cache / "synthetic"
    assert open_model_source("synthetic://llama-tiny").path == llama_tiny_dir
    assert llama_tiny_dir.name == f"llama-tiny-v{SYNTHETIC_FORMAT}"
    monkeypatch.delenv("RAYQUANT_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "rayquant" / "synthetic"


def test_local_directory_opens_like_its_synthetic_origin(llama_tiny_dir: Path, llama_copy: Path):
    synthetic = open_model_source(str(llama_tiny_dir))
    local = open_model_source(str(llama_copy))
    assert local.path == llama_copy
    assert local.revision == synthetic.revision
    assert {n: (i.dtype, i.shape, i.start, i.end) for n, i in local.tensors.items()} == {
        n: (i.dtype, i.shape, i.start, i.end) for n, i in synthetic.tensors.items()
    }


def test_revision_changes_with_config_and_with_a_shard_header(llama_copy: Path):
    before = open_model_source(str(llama_copy)).revision
    assert len(before) == 64 and before == open_model_source(str(llama_copy)).revision

    config = json.loads((llama_copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-5
    (llama_copy / "config.json").write_text(json.dumps(config))
    after_config = open_model_source(str(llama_copy)).revision
    assert after_config != before

    shard = llama_copy / "model-00002-of-00002.safetensors"
    tensors = load_file(shard)
    save_file(tensors, shard, {"format": "pt", "note": "re-exported"})
    assert open_model_source(str(llama_copy)).revision != after_config


def test_single_file_model_opens_without_an_index(bert_tiny_dir: Path):
    source = open_model_source(str(bert_tiny_dir))
    expected = load_file(bert_tiny_dir / "model.safetensors")
    assert set(source.tensors) == set(expected)
    name = "bert.encoder.layer.1.attention.self.query.weight"
    assert torch.equal(read_source_tensor(source, name), expected[name])


def test_missing_directory_names_the_path_and_model_source(tmp_path: Path):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelNotFound) as err:
        open_model_source(str(missing))
    assert str(missing) in str(err.value) and "does not exist" in str(err.value)
    assert "model.source" in str(err.value)


def test_directory_without_config_is_not_a_model(llama_copy: Path):
    (llama_copy / "config.json").unlink()
    with pytest.raises(ModelNotFound, match="no config.json.*model.source"):
        open_model_source(str(llama_copy))


def test_pickle_only_directory_is_refused_without_unpickling(tmp_path: Path):
    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    marker = tmp_path / "unpickled"
    # loading this file would create `marker`: proof that the refusal never touches the pickle
    (model_dir / "pytorch_model.bin").write_bytes(pickle.dumps(_TouchOnLoad(marker)))
    with pytest.raises(ModelNotFound) as err:
        open_model_source(str(model_dir))
    message = str(err.value)
    assert "pytorch_model.bin" in message and "safetensors only" in message and "pickle" in message
    assert not marker.exists()


class _TouchOnLoad:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_directory_without_any_weights_says_so(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound, match=r"no \*\.safetensors weights"):
        open_model_source(str(tmp_path))


def test_index_naming_a_missing_shard_says_the_download_is_incomplete(llama_copy: Path):
    (llama_copy / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFound, match="model-00002-of-00002.safetensors.*incomplete"):
        open_model_source(str(llama_copy))


def test_index_placing_a_tensor_in_the_wrong_shard_is_invalid(llama_copy: Path):
    index_path = llama_copy / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["lm_head.weight"] = "model-00001-of-00002.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidModelFiles, match="lm_head.weight.*model-00001-of-00002.safetensors"):
        open_model_source(str(llama_copy))


def test_malformed_config_is_invalid(llama_copy: Path):
    (llama_copy / "config.json").write_text('{"model_type": "llama",')
    with pytest.raises(InvalidModelFiles, match="config.json is not valid JSON"):
        open_model_source(str(llama_copy))


def test_truncated_shard_is_reported_when_the_source_is_opened(llama_copy: Path):
    shard = llama_copy / "model-00001-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(CorruptSafetensors) as err:
        open_model_source(str(llama_copy))
    assert str(shard) in str(err.value) and "truncated" in str(err.value)


@pytest.mark.parametrize("uri", ["gs://bucket/models/llama", "https://example.com/llama"])
def test_other_schemes_are_refused_with_the_supported_ones(uri: str):
    with pytest.raises(UnsupportedModelSource) as err:
        open_model_source(uri)
    assert "not supported" in str(err.value) and uri in str(err.value) and "s3://bucket/prefix" in str(err.value)


def test_unknown_synthetic_preset_lists_the_presets(synthetic_dir: Path):
    with pytest.raises(ModelNotFound) as err:
        open_model_source("synthetic://llama-405b-typo", cache_dir=synthetic_dir)
    assert "synthetic://llama-tiny" in str(err.value) and "model.source" in str(err.value)
    assert not (synthetic_dir / "llama-405b-typo").exists()


def test_unknown_tensor_name_is_a_typed_error(llama_tiny_dir: Path):
    source = open_model_source(str(llama_tiny_dir))
    with pytest.raises(TensorNotFound, match="model.layers.9.mlp.up_proj.weight"):
        read_source_tensor(source, "model.layers.9.mlp.up_proj.weight")


def test_aux_files_lists_the_tokenizer_and_generation_files_present(llama_copy: Path):
    source = open_model_source(str(llama_copy))
    expected = ["tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert [p.name for p in list_aux_files(source)] == expected
    assert all(name in AUX_FILES for name in expected)
    (llama_copy / "special_tokens_map.json").write_text("{}")
    assert [p.name for p in list_aux_files(source)] == [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "generation_config.json",
    ]


def test_relative_directory_is_returned_as_an_absolute_path(
    llama_copy: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(llama_copy.parent)
    source = open_model_source(llama_copy.name)
    assert source.path == llama_copy and source.path.is_absolute()

"""storage/generated.py: full-size presets listed on the meta device, and written out as real shards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from rayquant.storage import generated
from rayquant.storage.generated import GENERATED_PRESETS, generate_tensor, generated_tensor_infos, write_generated_model
from rayquant.storage.model_source import open_model_source, read_source_tensor
from rayquant.storage.safetensors_reader import INDEX_FILE

# a Llama small enough to write in a test; 3 blocks, of which the test writes 2
TINY_LLAMA = dict(GENERATED_PRESETS["llama-8b"], vocab_size=1024, hidden_size=64, intermediate_size=160,
                  num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2)


def test_qwen3_30b_a3b_lists_one_linear_per_expert_at_the_real_shapes(tmp_path: Path):
    infos = generated_tensor_infos(GENERATED_PRESETS["qwen3-30b-a3b"], tmp_path)
    block = {n.removeprefix("model.layers.47."): i.shape for n, i in infos.items() if n.startswith("model.layers.47.")}
    experts = {n for n in block if n.startswith("mlp.experts.")}
    assert experts == {f"mlp.experts.{e}.{p}_proj.weight" for e in range(128) for p in ("gate", "up", "down")}
    assert block["mlp.experts.0.gate_proj.weight"] == (768, 2048)  # [N, K]
    assert block["mlp.experts.127.up_proj.weight"] == (768, 2048)
    assert block["mlp.experts.5.down_proj.weight"] == (2048, 768)
    assert block["mlp.gate.weight"] == (128, 2048)  # the router
    assert block["self_attn.q_proj.weight"] == (32 * 128, 2048)
    assert block["self_attn.k_proj.weight"] == (4 * 128, 2048)
    assert block["self_attn.o_proj.weight"] == (2048, 32 * 128)
    assert set(block) - experts == {
        "input_layernorm.weight", "post_attention_layernorm.weight", "mlp.gate.weight", "self_attn.q_norm.weight",
        "self_attn.k_norm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
        "self_attn.o_proj.weight"}
    assert "model.layers.48.input_layernorm.weight" not in infos
    assert sum(math.prod(i.shape) for i in infos.values()) == pytest.approx(30.5e9, rel=0.01)


def test_written_model_reads_back_as_the_generated_tensors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(GENERATED_PRESETS, "llama-tiny-generated", TINY_LLAMA)
    max_shard_bytes = 64 * 1024
    out = write_generated_model("llama-tiny-generated", tmp_path / "model", n_blocks=2, max_shard_bytes=max_shard_bytes)

    source = open_model_source(str(out))
    assert source.config == dict(TINY_LLAMA, num_hidden_layers=2)
    expected = generated_tensor_infos(source.config, out)
    assert set(source.tensors) == set(expected)
    assert not any(name.startswith("model.layers.2.") for name in source.tensors)
    for name, info in source.tensors.items():
        assert info.shape == expected[name].shape and info.dtype == "BF16"
        assert read_source_tensor(source, name).equal(generate_tensor(name, info)), name

    shard_names: dict[str, list[str]] = {}
    for name, file in json.loads((out / INDEX_FILE).read_text())["weight_map"].items():
        shard_names.setdefault(file, []).append(name)
    assert sorted(shard_names) == sorted(p.name for p in out.glob("model-*.safetensors")) and len(shard_names) > 2
    for names in shard_names.values():  # whole blocks; a block or non-block tensor over the limit is a shard alone
        nbytes = sum(source.tensors[n].end - source.tensors[n].start for n in names)
        blocks = {n.split(".")[2] if n.startswith("model.layers.") else n for n in names}
        assert nbytes <= max_shard_bytes or len(blocks) == 1
    for block in ("0", "1"):
        assert len({file for name, file in json.loads((out / INDEX_FILE).read_text())["weight_map"].items()
                    if name.startswith(f"model.layers.{block}.")}) == 1  # never cut through a block
    assert (out / "tokenizer.json").is_file()


def test_writing_more_blocks_than_the_preset_has_is_refused(tmp_path: Path):
    with pytest.raises(ValueError, match="has 32 blocks"):
        write_generated_model("llama-8b", tmp_path, n_blocks=33)
    assert not (tmp_path / "config.json").exists()


def test_a_synthetic_source_lists_its_tensors_once_per_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setitem(GENERATED_PRESETS, "llama-tiny-generated", TINY_LLAMA)
    listed = []
    monkeypatch.setattr(generated, "generated_tensor_infos",
                        lambda config, path: listed.append(config) or generated_tensor_infos(config, path))
    first = open_model_source("synthetic://llama-tiny-generated", cache_dir=tmp_path)
    again = open_model_source("synthetic://llama-tiny-generated", cache_dir=tmp_path)
    assert len(listed) == 1 and again.tensors == first.tensors  # the second open read tensor-shapes.json
    assert first.tensors == generated_tensor_infos(first.config, first.path)

    shapes = first.path / "tensor-shapes.json"
    shapes.write_text(shapes.read_text()[:50])  # damaged: listed again, and rewritten
    assert open_model_source("synthetic://llama-tiny-generated", cache_dir=tmp_path).tensors == first.tensors
    assert len(listed) == 2 and json.loads(shapes.read_text())["shapes"]
    monkeypatch.setattr(generated, "version", lambda package: "0.0-other")  # another transformers: listed again
    assert open_model_source("synthetic://llama-tiny-generated", cache_dir=tmp_path).tensors == first.tensors
    assert len(listed) == 3

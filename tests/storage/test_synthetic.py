import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForMaskedLM,
    AutoTokenizer,
    PreTrainedTokenizerFast,
)

from rayquant.storage.synthetic import PRESETS, UnknownSyntheticPreset, materialize_synthetic


def _file_digests(model_dir: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(model_dir.iterdir())}


def _all_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    weights: dict[str, torch.Tensor] = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def test_llama_tiny_built_twice_has_identical_bytes_and_leaves_global_rng_alone(
    llama_tiny_dir: Path, tmp_path: Path
):
    rng_before = torch.random.get_rng_state()
    second = materialize_synthetic("llama-tiny", tmp_path)
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    assert second != llama_tiny_dir
    assert _file_digests(second) == _file_digests(llama_tiny_dir)
    assert sorted(_file_digests(second)) == [
        "config.json",
        "generation_config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert [p.name for p in tmp_path.iterdir()] == [second.name]  # no staging directory left


def test_llama_tiny_loads_in_transformers_with_the_stored_weights(llama_tiny_dir: Path):
    model = AutoModelForCausalLM.from_pretrained(llama_tiny_dir)
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (128, 256, 4)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (4, 2, 1024)
    assert config.tie_word_embeddings is False and model.dtype == torch.bfloat16
    stored = _all_weights(llama_tiny_dir)
    loaded = model.state_dict()
    assert set(loaded) == set(stored)
    for name, tensor in stored.items():
        assert torch.equal(loaded[name], tensor), name
    # a seeded random init, not zeros or a constant: Llama's init is N(0, 0.02)
    q = stored["model.layers.0.self_attn.q_proj.weight"].float()
    assert 0.018 < q.std().item() < 0.022
    assert not torch.equal(q, stored["model.layers.1.self_attn.q_proj.weight"].float())


def test_llama_tiny_is_split_into_two_shards_with_an_index(llama_tiny_dir: Path):
    index = json.loads((llama_tiny_dir / "model.safetensors.index.json").read_text())
    stored = _all_weights(llama_tiny_dir)
    assert set(index["weight_map"]) == set(stored)
    assert index["weight_map"]["model.embed_tokens.weight"] == "model-00001-of-00002.safetensors"
    assert index["weight_map"]["lm_head.weight"] == "model-00002-of-00002.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in stored.values())


def test_llama_tiny_tokenizer_loads_with_auto_tokenizer(llama_tiny_dir: Path):
    tokenizer = AutoTokenizer.from_pretrained(llama_tiny_dir)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == 1024
    assert (tokenizer.bos_token, tokenizer.bos_token_id) == ("<s>", 0)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("</s>", 1)
    text = "The interpreter prints a welcome message.\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == 0 and 1 not in ids
    assert len(ids) < len(text.encode()) // 2  # trained merges, not bytes
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer("naïve — ✓")["input_ids"][1:]) == "naïve — ✓"  # byte-level


def test_existing_model_is_reused_not_rebuilt(llama_tiny_dir: Path, synthetic_dir: Path):
    mtimes = {p.name: p.stat().st_mtime_ns for p in llama_tiny_dir.iterdir()}
    assert materialize_synthetic("llama-tiny", synthetic_dir) == llama_tiny_dir
    assert {p.name: p.stat().st_mtime_ns for p in llama_tiny_dir.iterdir()} == mtimes


def test_failed_build_leaves_neither_a_model_nor_a_staging_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def build_half_then_fail(out_dir: Path) -> None:
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setitem(PRESETS, "half-built", build_half_then_fail)
    with pytest.raises(RuntimeError, match="disk full"):
        materialize_synthetic("half-built", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_unknown_preset_lists_the_presets(tmp_path: Path):
    with pytest.raises(UnknownSyntheticPreset) as err:
        materialize_synthetic("mixtral-huge", tmp_path)
    for name in ("llama-tiny", "mistral-tiny", "qwen2-tiny", "qwen3-tiny", "bert-tiny"):
        assert f"synthetic://{name}" in str(err.value)


def test_bert_tiny_is_an_encoder_only_masked_lm(bert_tiny_dir: Path):
    config = AutoConfig.from_pretrained(bert_tiny_dir)
    assert config.model_type == "bert" and config.architectures == ["BertForMaskedLM"]
    model = AutoModelForMaskedLM.from_pretrained(bert_tiny_dir)
    stored = load_file(bert_tiny_dir / "model.safetensors")
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(model.state_dict()[name], stored[name])

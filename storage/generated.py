"""Full-size synthetic shapes (`synthetic://llama-70b`, `llama-405b`, ...): tensors made on read.

Nothing but config.json and a small byte-level BPE tokenizer is written (its ids are valid in any
larger vocabulary); every weight is drawn on the device that reads it, from a generator seeded by
the tensor's name, so a 405B-shaped model needs neither disk nor host memory. Benchmarks use these
to run the real block pipeline at real shapes. `write_generated_model` writes the same tensors as
real safetensors shards (optionally only the first blocks), so a benchmark can also measure loading.
"""

from __future__ import annotations

import hashlib
import json
import math
from importlib.metadata import version
from pathlib import Path

import torch
from safetensors.torch import save_file

from rayquant.storage.atomic_files import json_writer, write_atomic
from rayquant.storage.safetensors_reader import INDEX_FILE, TensorInfo
from rayquant.storage.shard_plan import PlannedTensor, block_of_tensor, plan_shards

INIT_STD = 0.02  # transformers' default initializer_range
_LLAMA3 = dict(vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072, rms_norm_eps=1e-5,
               bos_token_id=128000, eos_token_id=128001, tie_word_embeddings=False, dtype="bfloat16",
               architectures=["LlamaForCausalLM"], model_type="llama")
# Add a shape here to benchmark it: transformers config fields of a real model.
GENERATED_PRESETS: dict[str, dict] = {
    "llama-8b": dict(_LLAMA3, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                     num_attention_heads=32, num_key_value_heads=8),
    "llama-70b": dict(_LLAMA3, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8),
    "llama-405b": dict(_LLAMA3, hidden_size=16384, intermediate_size=53248, num_hidden_layers=126,
                       num_attention_heads=128, num_key_value_heads=8),
    # DeepSeek-V3 (671B): MLA, 3 dense blocks, then 256 routed experts of 7168 -> 2048 (top-8) + 1 shared
    # expert per block. Without its YaRN rope scaling (same shapes and costs).
    "deepseek-v3": dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                        num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1,
                        n_routed_experts=256, routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536,
                        qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4,
                        num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
                        max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000.0, bos_token_id=0,
                        eos_token_id=1, tie_word_embeddings=False, dtype="bfloat16",
                        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3"),
    # Qwen3-30B-A3B: 48 blocks of 128 routed experts of 2048 -> 768 (top-8), no shared expert; 30.5B parameters
    "qwen3-30b-a3b": dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                          num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                          num_experts=128, num_experts_per_tok=8, decoder_sparse_step=1, mlp_only_layers=[],
                          norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1000000.0,
                          max_position_embeddings=40960, bos_token_id=151643, eos_token_id=151645,
                          tie_word_embeddings=False, dtype="bfloat16", architectures=["Qwen3MoeForCausalLM"],
                          model_type="qwen3_moe"),
}
_BLOCKS_PATH = "model.layers"  # where every preset's transformers model keeps its decoder blocks
# the tensors' names and shapes, kept beside config.json: listing them builds the model class (seconds,
# on the driver and again on each worker of every job)
_INFOS_FILE = "tensor-shapes.json"


def materialize_generated(preset: str, cache_dir: Path) -> Path:
    """Write the preset's config.json and tokenizer under cache_dir once; return the directory."""
    target = Path(cache_dir) / f"{preset}-generated"
    if not (target / "config.json").is_file():
        _write_config_and_tokenizer(target, GENERATED_PRESETS[preset])
    return target


def write_generated_model(preset: str, target_dir: Path, n_blocks: int | None = None,
                          device: torch.device | str = "cpu", max_shard_bytes: int = 4 * 2**30) -> Path:
    """Write the preset as a model directory with real safetensors shards; return the directory.

    The tensors are generate_tensor's, so a job on the directory sees the weights of
    synthetic://<preset>; with n_blocks, only the first n_blocks blocks (config.json says so).
    Weights are drawn on `device` (cuda is far faster) one shard at a time: host memory holds one
    shard of at most max_shard_bytes (or one larger tensor). config.json is written last, so an
    interrupted write leaves no openable model.

    Raises:
        ValueError: n_blocks is not in 1..num_hidden_layers.
    """
    config = dict(GENERATED_PRESETS[preset])
    if n_blocks is not None:
        if not 1 <= n_blocks <= config["num_hidden_layers"]:
            raise ValueError(f"n_blocks={n_blocks}: {preset} has {config['num_hidden_layers']} blocks; pass 1 to that")
        config["num_hidden_layers"] = n_blocks
    target = Path(target_dir)
    target.mkdir(parents=True, exist_ok=True)
    infos = generated_tensor_infos(config, target)
    n = config["num_hidden_layers"]  # whole blocks per shard, as rayquant's own outputs
    plan = plan_shards([PlannedTensor(name, info.dtype, info.shape, block_of_tensor(name, _BLOCKS_PATH, n))
                        for name, info in infos.items()], max_shard_bytes)
    for shard in plan.shards:
        tensors = {t.name: generate_tensor(t.name, infos[t.name], device).cpu() for t in shard.tensors}
        save_file(tensors, target / shard.name, {"format": "pt"})
        del tensors  # freed before the next shard is drawn
    index = {"metadata": {"total_size": plan.total_tensor_bytes}, "weight_map": dict(sorted(plan.weight_map().items()))}
    (target / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    _write_config_and_tokenizer(target, config)
    return target


def cached_tensor_infos(config: dict, path: Path) -> dict[str, TensorInfo]:
    """generated_tensor_infos, read from path's tensor-shapes.json when that was listed for this config by this
    transformers version (its names could change with the version); else listed and written there."""
    key = hashlib.sha256(json.dumps([config, version("transformers")], sort_keys=True).encode()).hexdigest()
    try:
        cached = json.loads((path / _INFOS_FILE).read_text(encoding="utf-8"))
        if cached["key"] == key:
            return {name: _info(path, tuple(shape)) for name, shape in cached["shapes"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or damaged: list them again
    infos = generated_tensor_infos(config, path)
    shapes = {name: list(info.shape) for name, info in infos.items()}
    write_atomic(path, path / _INFOS_FILE, json_writer({"key": key, "shapes": shapes}))
    return infos


def _info(path: Path, shape: tuple[int, ...]) -> TensorInfo:
    return TensorInfo(file=path / "generated", dtype="BF16", shape=shape, start=0, end=math.prod(shape) * 2)


def generated_tensor_infos(config: dict, path: Path) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every weight, from the model class itself on the meta device.

    Names and shapes are the checkpoint's, as save_pretrained writes them (MoE experts one linear each).
    """
    # imported here: transformers' model loading pulls in torch._dynamo and DTensor (seconds), which
    # opening a synthetic:// or local source does not need
    from transformers import AutoModelForCausalLM
    from transformers.core_model_loading import revert_weight_conversion
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    cfg = CONFIG_MAPPING[config["model_type"]].from_dict({k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    return {name: _info(path, tuple(t.shape)) for name, t in revert_weight_conversion(model, model.state_dict()).items()}


def generate_tensor(name: str, info: TensorInfo, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor `name`: ones for norms, N(0, INIT_STD) otherwise; bf16, seeded by the name."""
    if name.endswith("norm.weight"):
        return torch.ones(info.shape, dtype=torch.bfloat16, device=device)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(info.shape, generator=gen, device=device) * INIT_STD).to(torch.bfloat16)


def _write_config_and_tokenizer(target: Path, config: dict) -> None:
    """The tokenizer, then config.json (renamed into place last: its presence means the directory is whole)."""
    from rayquant.storage.synthetic import write_tokenizer  # builds from the shipped text

    target.mkdir(parents=True, exist_ok=True)
    write_tokenizer(target, vocab_size=1024, model_max_length=config["max_position_embeddings"])
    tmp = target / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tmp.replace(target / "config.json")

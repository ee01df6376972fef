"""Full-size synthetic shapes (`synthetic://llama-70b`, `llama-405b`, ...): tensors made on read.

Nothing but config.json and a small byte-level BPE tokenizer is written (its ids are valid in any
larger vocabulary); every weight is drawn on the device that reads it, from a generator seeded by
the tensor's name, so a 405B-shaped model needs neither disk nor host memory. Benchmarks use these
to run the real block pipeline at real shapes.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from rayquant.storage.safetensors_reader import TensorInfo

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
}


def materialize_generated(preset: str, cache_dir: Path) -> Path:
    """Write the preset's config.json and tokenizer under cache_dir once; return the directory."""
    from rayquant.storage.synthetic import write_tokenizer  # builds from the shipped text

    target = Path(cache_dir) / f"{preset}-generated"
    config_path = target / "config.json"
    if not config_path.is_file():
        target.mkdir(parents=True, exist_ok=True)
        write_tokenizer(target, vocab_size=1024, model_max_length=GENERATED_PRESETS[preset]["max_position_embeddings"])
        tmp = target / "config.json.tmp"
        tmp.write_text(json.dumps(GENERATED_PRESETS[preset], indent=2, sort_keys=True) + "\n")
        tmp.replace(config_path)
    return target


def generated_tensor_infos(config: dict, path: Path) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every weight, from the model class itself on the meta device."""
    cfg = LlamaConfig.from_dict({k: v for k, v in config.items() if k != "model_type"})
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    infos = {}
    for name, t in model.state_dict().items():
        nbytes = t.numel() * t.element_size()
        infos[name] = TensorInfo(file=path / "generated", dtype="BF16", shape=tuple(t.shape), start=0, end=nbytes)
    return infos


def generate_tensor(name: str, info: TensorInfo, device: torch.device | str = "cpu") -> torch.Tensor:
    """The tensor `name`: ones for norms, N(0, INIT_STD) otherwise; bf16, seeded by the name."""
    if name.endswith("norm.weight"):
        return torch.ones(info.shape, dtype=torch.bfloat16, device=device)
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") & (2**63 - 1)
    gen = torch.Generator(device=device).manual_seed(seed)
    return (torch.randn(info.shape, generator=gen, device=device) * INIT_STD).to(torch.bfloat16)

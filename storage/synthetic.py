"""`synthetic://<preset>` models: tiny transformers models from a seeded random init, on disk.

A preset is written exactly like a downloaded Hugging Face model (config.json, safetensors shards
+ index, generation_config.json, tokenizer files), so it is read through the same path as any
other source. The bytes are a pure function of the preset and the installed transformers /
tokenizers versions; they are built in a temporary directory beside the target and renamed into
place, so a concurrent process sees either no model or the whole model. The init draws from
torch's global generator (forked, so the caller's RNG state is untouched): build from one thread
of a process at a time.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
import transformers  # lazy: a model class's module is imported when a builder first names it

from rayquant.storage.text_sources import BUILTIN_TEXT_PATH
from rayquant.storage.safetensors_reader import INDEX_FILE

if TYPE_CHECKING:
    from transformers import PreTrainedConfig, PreTrainedModel

# bump when a builder's output changes, so caches built by older code are not reused
SYNTHETIC_FORMAT = 2
SEED = 0
BOS_TOKEN, EOS_TOKEN = "<s>", "</s>"  # ids 0 and 1 in the trained vocabulary


class UnknownSyntheticPreset(Exception):
    """model.source names a synthetic:// preset that does not exist."""


def materialize_synthetic(preset: str, cache_dir: Path) -> Path:
    """Build the preset's model directory under cache_dir once and return its path.

    Raises:
        UnknownSyntheticPreset: preset is not one of PRESETS.
    """
    if preset not in PRESETS:
        raise UnknownSyntheticPreset(
            f"model.source synthetic://{preset}: no such preset; use one of "
            f"{', '.join('synthetic://' + name for name in PRESETS)}"
        )
    cache_dir = Path(cache_dir)
    target = cache_dir / f"{preset}-v{SYNTHETIC_FORMAT}"
    if target.is_dir():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    staging.chmod(0o755)  # mkdtemp makes it owner-only; the cache is shared like any download
    try:
        PRESETS[preset](staging)
        try:
            os.replace(staging, target)
        except OSError:
            # another process renamed its complete copy into place first; its bytes equal ours
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def build_llama_tiny(out_dir: Path) -> None:
    """Llama-shaped decoder (GQA 4 heads / 2 kv heads, 4 blocks), bf16, two shards + index."""
    _build_tiny_decoder(out_dir, transformers.LlamaConfig, transformers.LlamaForCausalLM)


def build_mistral_tiny(out_dir: Path) -> None:
    """Mistral: Llama's shapes with a sliding attention window."""
    _build_tiny_decoder(out_dir, transformers.MistralConfig, transformers.MistralForCausalLM, sliding_window=64)


def build_qwen2_tiny(out_dir: Path) -> None:
    """Qwen2: biases on q/k/v."""
    # AutoTokenizer loads a qwen2 model's tokenizer as Qwen2Tokenizer, which adds its default
    # unk/pad token <|endoftext|> (id 1024, past vocab_size) unless the config names them
    _build_tiny_decoder(out_dir, transformers.Qwen2Config, transformers.Qwen2ForCausalLM,
                        special_tokens={"unk_token": EOS_TOKEN, "pad_token": EOS_TOKEN})


def build_qwen3_tiny(out_dir: Path) -> None:
    """Qwen3: RMS norms on q and k inside attention, explicit head_dim."""
    _build_tiny_decoder(out_dir, transformers.Qwen3Config, transformers.Qwen3ForCausalLM, head_dim=32)


def build_gemma2_tiny(out_dir: Path) -> None:
    """Gemma 2: alternating sliding/full layers, scaled embeddings, logit soft-capping, tied head."""
    _build_tiny_decoder(out_dir, transformers.Gemma2Config, transformers.Gemma2ForCausalLM, head_dim=32,
                        query_pre_attn_scalar=32, sliding_window=64, tie_word_embeddings=True, pad_token_id=1)


def build_gemma3_tiny(out_dir: Path) -> None:
    """Gemma 3 text: sliding/full layers with their own rotary bases, q/k norms, tied head."""
    _build_tiny_decoder(out_dir, transformers.Gemma3TextConfig, transformers.Gemma3ForCausalLM, head_dim=32,
                        query_pre_attn_scalar=32, sliding_window=64, tie_word_embeddings=True, pad_token_id=1,
                        layer_types=["sliding_attention", "full_attention"] * 2)


def build_phi3_tiny(out_dir: Path) -> None:
    """Phi-3: fused qkv_proj and gate_up_proj linears."""
    _build_tiny_decoder(out_dir, transformers.Phi3Config, transformers.Phi3ForCausalLM, pad_token_id=1)


def build_opt_tiny(out_dir: Path) -> None:
    """OPT: blocks under model.decoder.layers, fc1/fc2 with biases, learned positions, project_in/out
    (word_embed_proj_dim < hidden, as OPT-350m) outside the blocks, tied head."""
    shapes = {"hidden_size": 128, "ffn_dim": 256, "num_hidden_layers": 4, "num_attention_heads": 4}
    _build_tiny_decoder(out_dir, transformers.OPTConfig, transformers.OPTForCausalLM, shapes=shapes,
                        word_embed_proj_dim=64, tie_word_embeddings=True, pad_token_id=1)


# MoE: 8 routed experts of 128 x 128 (top-2); 4 blocks like the dense presets
_MOE = {"num_experts_per_tok": 2, "moe_intermediate_size": 128}
# DeepSeek MLA attention (q/kv low-rank projections, decoupled rope dims), one shared expert, block 0 dense
_DEEPSEEK = _MOE | {"n_routed_experts": 8, "n_shared_experts": 1, "first_k_dense_replace": 1, "kv_lora_rank": 64,
                    "qk_rope_head_dim": 16, "qk_nope_head_dim": 32, "v_head_dim": 32}
_MLA_SHAPES = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
               "num_key_value_heads": 4}  # MLA: one latent kv shared by all heads, no GQA


def build_mixtral_tiny(out_dir: Path) -> None:
    """Mixtral: every block sparse, 8 experts (block_sparse_moe.experts.{e}.w1/w2/w3 on disk)."""
    _build_tiny_decoder(out_dir, transformers.MixtralConfig, transformers.MixtralForCausalLM, num_local_experts=8,
                        num_experts_per_tok=2)


def build_qwen2_moe_tiny(out_dir: Path) -> None:
    """Qwen2-MoE: 8 experts + a shared expert behind a sigmoid shared_expert_gate, q/k/v biases."""
    _build_tiny_decoder(out_dir, transformers.Qwen2MoeConfig, transformers.Qwen2MoeForCausalLM, num_experts=8,
                        shared_expert_intermediate_size=256, **_MOE)


def build_qwen3_moe_tiny(out_dir: Path) -> None:
    """Qwen3-MoE: 8 experts (transformers' Qwen3-MoE has no shared expert), q/k norms."""
    _build_tiny_decoder(out_dir, transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM, num_experts=8,
                        head_dim=32, **_MOE)


def build_deepseek_v2_tiny(out_dir: Path) -> None:
    """DeepSeek-V2(-Lite): MLA without a q low-rank (q_proj), softmax greedy routing, dense block 0."""
    _build_tiny_decoder(out_dir, transformers.DeepseekV2Config, transformers.DeepseekV2ForCausalLM,
                        shapes=_MLA_SHAPES, q_lora_rank=None, topk_method="greedy", **_DEEPSEEK)


def build_deepseek_v3_tiny(out_dir: Path) -> None:
    """DeepSeek-V3: MLA with q_a/q_b, sigmoid group-limited routing with a score-correction bias, dense block 0."""
    _build_tiny_decoder(out_dir, transformers.DeepseekV3Config, transformers.DeepseekV3ForCausalLM,
                        shapes=_MLA_SHAPES, q_lora_rank=64, n_group=2, topk_group=1, **_DEEPSEEK)


STARVED_EXPERTS = (6, 7)  # deepseek-v3-starved-tiny: the router never picks these experts


def build_deepseek_v3_starved_tiny(out_dir: Path) -> None:
    """deepseek-v3-tiny whose routers never pick STARVED_EXPERTS: their score-correction bias is -1e4, which
    only the choice of experts reads (the gating weights use the raw scores), so no token reaches them."""
    build_deepseek_v3_tiny(out_dir)
    for shard in sorted(out_dir.glob("*.safetensors")):
        tensors = load_file(shard)
        biases = [name for name in tensors if name.endswith(".mlp.gate.e_score_correction_bias")]
        for name in biases:
            tensors[name][list(STARVED_EXPERTS)] = -1e4
        if biases:
            save_file(tensors, shard, {"format": "pt"})


# Llama-style sizes; families with other field names pass their own
_TINY_SHAPES = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                "num_key_value_heads": 2}
_BLOCK_INDEX = re.compile(r"\.layers\.(\d+)\.")


def _build_tiny_decoder(out_dir: Path, config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel],
                        shapes: dict[str, int] = _TINY_SHAPES, special_tokens: dict[str, str] | None = None,
                        **extra: object) -> None:
    """A 4-block dense decoder of the given family, bf16, two shards + index, generation config, tokenizer."""
    settings = {"vocab_size": 1024, "max_position_embeddings": 2048, "tie_word_embeddings": False,
                "dtype": "bfloat16", "bos_token_id": 0, "eos_token_id": 1} | extra
    config = config_class(architectures=[model_class.__name__], **shapes, **settings)
    state = _seeded_state_dict(model_class, config)
    if config.tie_word_embeddings:
        del state["lm_head.weight"]  # it is the embedding matrix; safetensors stores no shared tensors

    # shard 1: embeddings + first half of the blocks; shard 2: the rest, final norm and lm_head
    def in_first_shard(name: str) -> bool:
        block = _BLOCK_INDEX.search(name)
        return int(block[1]) < config.num_hidden_layers // 2 if block else ".embed_" in name

    first = sorted(name for name in state if in_first_shard(name))
    second = sorted(name for name in state if not in_first_shard(name))
    _write_weights(state, [first, second], out_dir)
    config.save_pretrained(out_dir)
    transformers.GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    write_tokenizer(out_dir, vocab_size=config.vocab_size, model_max_length=2048, **(special_tokens or {}))


def build_bert_tiny(out_dir: Path) -> None:
    """Encoder-only BERT masked LM: a real architecture that rayquant does not quantize."""
    config = transformers.BertConfig(
        architectures=["BertForMaskedLM"],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=1024,
        max_position_embeddings=512,
        tie_word_embeddings=False,  # safetensors stores no shared tensors
        dtype="float32",
    )
    state = _seeded_state_dict(transformers.BertForMaskedLM, config)
    _write_weights(state, [sorted(state)], out_dir)
    config.save_pretrained(out_dir)
    write_tokenizer(out_dir, vocab_size=config.vocab_size, model_max_length=512)


def _seeded_state_dict(
    model_class: type[PreTrainedModel], config: PreTrainedConfig
) -> dict[str, torch.Tensor]:
    """transformers' own init under a fixed seed, cast to config.dtype; global RNG untouched."""
    from transformers.core_model_loading import revert_weight_conversion  # heavy: only when building

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        model = model_class(config)
    model = model.to(config.dtype)
    # the names and layout save_pretrained writes: transformers 5 fuses MoE experts into 3-D parameters
    # in memory, checkpoints hold one linear per expert (a no-op for families without a conversion)
    state = revert_weight_conversion(model, model.state_dict())
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in state.items()}


def _write_weights(state: dict[str, torch.Tensor], shards: list[list[str]], out_dir: Path) -> None:
    """One safetensors file per list of names; with more than one, also the HF index file."""
    if len(shards) == 1:
        save_file({name: state[name] for name in shards[0]}, out_dir / "model.safetensors", {"format": "pt"})
        return
    weight_map: dict[str, str] = {}
    for i, names in enumerate(shards, start=1):
        file_name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({name: state[name] for name in names}, out_dir / file_name, {"format": "pt"})
        weight_map.update({name: file_name for name in names})
    total_size = sum(state[name].numel() * state[name].element_size() for name in weight_map)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: Path, vocab_size: int, model_max_length: int, **special_tokens: str) -> None:
    """Byte-level BPE trained on the builtin text; tokenizer.json + tokenizer_config.json."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[BOS_TOKEN, EOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    paragraphs = BUILTIN_TEXT_PATH.read_text(encoding="utf-8").split("\n\n")
    tokenizer.train_from_iterator(paragraphs, trainer)
    # Llama convention: BOS in front, no EOS
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, tokenizer.token_to_id(BOS_TOKEN))],
    )
    transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        model_max_length=model_max_length,
        **special_tokens,  # e.g. unk_token / pad_token, so a family's tokenizer class adds no token of its own
    ).save_pretrained(out_dir)


PRESETS: dict[str, Callable[[Path], None]] = {
    "llama-tiny": build_llama_tiny,
    "mistral-tiny": build_mistral_tiny,
    "qwen2-tiny": build_qwen2_tiny,
    "qwen3-tiny": build_qwen3_tiny,
    "gemma2-tiny": build_gemma2_tiny,
    "gemma3-tiny": build_gemma3_tiny,
    "phi3-tiny": build_phi3_tiny,
    "opt-tiny": build_opt_tiny,
    "mixtral-tiny": build_mixtral_tiny,
    "qwen2-moe-tiny": build_qwen2_moe_tiny,
    "qwen3-moe-tiny": build_qwen3_moe_tiny,
    "deepseek-v2-tiny": build_deepseek_v2_tiny,
    "deepseek-v3-tiny": build_deepseek_v3_tiny,
    "deepseek-v3-starved-tiny": build_deepseek_v3_starved_tiny,
    "bert-tiny": build_bert_tiny,
}

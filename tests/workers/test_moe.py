"""workers/moe.py on the tiny MoE presets: checkpoint names, exact forwards, one input group per expert."""

from __future__ import annotations

import weakref

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, GptOssConfig

from rayquant.storage.model_source import open_model_source
from rayquant.workers.adapter import (
    BlockInput,
    UnsupportedArchitecture,
    build_skeleton,
    find_input_groups,
    find_layout,
    materialize,
)
from rayquant.workers.moe import (
    RoutedExperts,
    expert_of,
    local_routed_tokens,
    reset_routed_tokens,
    sequential_stages,
    set_calibration,
    unfuse_experts,
)

FAMILIES = ["mixtral-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny", "deepseek-v2-tiny", "deepseek-v3-tiny"]
N_EXPERTS = 8


def _source_tensors(source, prefix: str) -> dict[str, torch.Tensor]:
    out = {}
    for name, info in source.tensors.items():
        if name.startswith(prefix):
            with safe_open(info.file, "pt") as f:
                out[name[len(prefix):]] = f.get_tensor(name)
    return out


def _moe_block(family: str):
    """(source, the transformers model, our unfused block 1 materialised, its input) in float32."""
    source = open_model_source(f"synthetic://{family}")
    skeleton = build_skeleton(source.config, torch.float32)
    assert unfuse_experts(skeleton) == 4 - source.config.get("first_k_dense_replace", 0)
    layout = find_layout(skeleton)
    prefix = layout.block_prefix(1)
    tensors = _source_tensors(source, prefix)
    # the unfused skeleton's names are exactly the checkpoint's: strict loading succeeds
    assert set(skeleton.get_submodule(layout.blocks_path)[1].state_dict()) == set(tensors)
    block = materialize(skeleton.get_submodule(layout.blocks_path)[1], tensors, torch.float32)
    model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32).eval()
    hidden = torch.randn(2, 24, source.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(24).expand(2, -1)
    kwargs = {"position_embeddings": model.model.rotary_emb(hidden, position_ids), "position_ids": position_ids,
              "attention_mask": None}
    return source, model, block, BlockInput(hidden, [kwargs])


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_unfused_block_computes_what_transformers_computes_in_both_modes(family):
    _, model, block, inp = _moe_block(family)
    want = model.model.layers[1](inp.hidden, **inp.kwargs)
    want = want[0] if isinstance(want, tuple) else want
    got = block(inp.hidden, **inp.kwargs)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want, rtol=0, atol=1e-5)
    set_calibration(block, True)  # every token through every expert: the output stays gated
    got = block(inp.hidden, **inp.kwargs)
    torch.testing.assert_close(got[0] if isinstance(got, tuple) else got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_every_expert_is_its_own_input_group_and_routers_are_never_quantized(family):
    source, _, block, inp = _moe_block(family)
    set_calibration(block, True)
    groups = find_input_groups(block, inp)
    linears = {lin for g in groups for lin in g.linears}
    assert not {lin for lin in linears if lin.rpartition(".")[2] in ("gate", "shared_expert_gate", "router")}
    experts = [g for g in groups if expert_of(block, g) is not None]
    assert len(experts) == 2 * N_EXPERTS  # gate+up, then down, of each expert
    assert sorted({expert_of(block, g).index for g in experts}) == list(range(N_EXPERTS))
    assert all(len(g.linears) == (1 if expert_of(block, g).role == "down" else 2) for g in experts)
    stages = sequential_stages(block, groups)
    expert_stages = [s for s in stages if expert_of(block, s[0]) is not None]
    assert [len(s) for s in expert_stages] == [N_EXPERTS, N_EXPERTS]  # all gate/up, then all down
    # routed counts: every token to exactly top-k experts (calibration mode runs all, counts the routed)
    reset_routed_tokens(block)
    block(inp.hidden, **inp.kwargs)
    counts = [local_routed_tokens(block, g) for g in experts if expert_of(block, g).role == "down"]
    assert sum(counts) == inp.hidden.shape[0] * inp.hidden.shape[1] * source.config["num_experts_per_tok"]


@torch.no_grad()
def test_finding_input_groups_keeps_no_expert_input_alive():
    """The probe forward must not hold every linear's input to its end: at DeepSeek-V3's size, with every
    token through every expert, that was 256 down-projection inputs of a micro-batch (~32 GB, out of memory
    on an 80 GB GPU before the first MoE block)."""
    _, _, block, inp = _moe_block("deepseek-v3-tiny")
    set_calibration(block, True)
    experts = next(m for m in block.modules() if isinstance(m, RoutedExperts))
    first_input: list[weakref.ref] = []
    alive_at_last: list[bool] = []
    experts[0].down_proj.register_forward_pre_hook(lambda _m, args: first_input.append(weakref.ref(args[0])))
    experts[len(experts) - 1].down_proj.register_forward_pre_hook(
        lambda _m, args: alive_at_last.append(first_input[-1]() is not None))
    groups = find_input_groups(block, inp)
    assert alive_at_last == [False]
    assert sum(1 for g in groups if expert_of(block, g) is not None) == 2 * N_EXPERTS  # the groups are unchanged


def test_calibration_mode_feeds_every_token_to_every_expert_hook():
    _, _, block, inp = _moe_block("deepseek-v3-tiny")
    seen = {}
    experts = next(m for m in block.modules() if isinstance(m, RoutedExperts))
    for e, expert in enumerate(experts):
        expert.gate_proj.register_forward_pre_hook(lambda _m, args, e=e: seen.__setitem__(e, args[0].shape[0]))
    with torch.no_grad():
        block(inp.hidden, **inp.kwargs)
        routed = dict(seen)
        seen.clear()
        set_calibration(block, True)
        block(inp.hidden, **inp.kwargs)
    n = inp.hidden.shape[0] * inp.hidden.shape[1]
    assert seen == {e: n for e in range(N_EXPERTS)}
    assert sum(routed.values()) == 2 * n and all(v < n for v in routed.values())


@pytest.mark.slow
def test_generated_deepseek_v3_names_are_the_unfused_skeletons():
    """synthetic://deepseek-v3 (671B shapes, no weights): what the worker loads is what the preset lists."""
    source = open_model_source("synthetic://deepseek-v3")
    skeleton = build_skeleton(source.config, torch.bfloat16)
    unfuse_experts(skeleton)
    layout = find_layout(skeleton)
    for b in (0, 3):  # a dense block, a MoE block of 256 experts
        prefix = layout.block_prefix(b)
        block_state = skeleton.get_submodule(layout.blocks_path)[b].state_dict()
        listed = {n[len(prefix):]: i for n, i in source.tensors.items() if n.startswith(prefix)}
        assert set(block_state) == set(listed)
        assert all(tuple(block_state[n].shape) == listed[n].shape for n in listed)
    assert source.tensors["model.layers.3.mlp.experts.255.down_proj.weight"].shape == (7168, 2048)


def test_other_fused_expert_layouts_are_refused_with_the_fix():
    """GPT-OSS fuses experts too, but interleaved [E, H, 2I] with biases: refused, not misread."""
    config = GptOssConfig(hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, vocab_size=128,
                          head_dim=16, architectures=["GptOssForCausalLM"])
    skeleton = build_skeleton(config.to_dict(), torch.float32)
    with pytest.raises(UnsupportedArchitecture, match=r"gate_up_proj_bias.*choose another model.source"):
        unfuse_experts(skeleton)

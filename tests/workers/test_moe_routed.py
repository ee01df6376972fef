"""quant.moe.hessian_tokens on the tiny MoE presets: one dispatch per forward computes what a torch.where per
expert computed, `routed` Hessians are the routed tokens' own, and starved experts get all-token Hessians
(one in-process worker, deepseek-v3-starved-tiny) under both settings."""

from __future__ import annotations

import socket

import pytest
import torch
from torch.nn import functional as F

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed
from rayquant.solver.rtn import rtn_weight
from rayquant.storage.synthetic import STARVED_EXPERTS
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup
from rayquant.workers.adapter import find_input_groups
from rayquant.workers.moe import (
    MoEConfig,
    RoutedExperts,
    StarvedExpert,
    calibrate_experts,
    expert_of,
    routed_experts,
    sequential_stages,
    set_calibration,
)
from rayquant.workers.stage_collect import collect_stage
from rayquant.workers.stage_inputs import StageInputs
from rayquant.workers.starved_experts import validation_samples

from .test_moe import _moe_block

CFG = GPTQConfig(bits=4, group_size=128)


def _forward_by_where(experts: RoutedExperts, hidden: torch.Tensor, top_k_index: torch.Tensor,
                      top_k_weights: torch.Tensor) -> torch.Tensor:
    """RoutedExperts.forward as it was: a torch.where (a device sync on CUDA) per expert."""
    out = torch.zeros_like(hidden)
    for e, expert in enumerate(experts):
        token_idx, top_k_pos = torch.where(top_k_index == e)
        if experts.calibrate_all or e in experts.calibrate_experts:
            y = experts._expert_forward(expert, hidden)[token_idx]
        elif token_idx.numel() == 0:
            continue
        else:
            y = experts._expert_forward(expert, hidden[token_idx])
        out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
    return out


def _expert_calls(block: torch.nn.Module, inp) -> tuple[RoutedExperts, list[tuple]]:
    """The block's experts module and the (hidden [T, H], top_k_index [T, k], top_k_weights) it was called with."""
    experts = routed_experts(block)[0]
    calls = []
    hook = experts.register_forward_pre_hook(lambda _m, args: calls.append(args))
    with torch.no_grad():
        block(inp.hidden, **inp.kwargs)
    hook.remove()
    return experts, calls


@pytest.mark.parametrize("family", ["mixtral-tiny", "qwen2-moe-tiny", "deepseek-v3-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@torch.no_grad()
def test_one_dispatch_per_forward_is_bitwise_the_per_expert_where(family, dtype):
    _, _, block, inp = _moe_block(family)
    experts, [(hidden, top_k_index, top_k_weights)] = _expert_calls(block, inp)
    experts.to(dtype)
    hidden, top_k_weights = hidden.to(dtype), top_k_weights.to(dtype)
    E, k = len(experts), top_k_index.shape[1]
    # a router's own choice, and random slots with repeats, a starved expert and dropped slots (index E)
    generator = torch.Generator().manual_seed(1)
    random_index = torch.randint(0, E + 1, top_k_index.shape, generator=generator)
    random_index[random_index == 3] = 4
    for index in (top_k_index, random_index):
        for calibrate_all, only in ((False, frozenset()), (True, frozenset()), (False, frozenset({0, 3}))):
            experts.calibrate_all, experts.calibrate_experts = calibrate_all, only
            experts.routed_tokens = None
            got = experts(hidden, index, top_k_weights)
            assert torch.equal(got, _forward_by_where(experts, hidden, index, top_k_weights))
            assert experts.routed_tokens.tolist() == [int((index == e).sum()) for e in range(E)]
    assert k == 2 and int((random_index == E).sum()) > 0 and int((random_index == 3).sum()) == 0


@pytest.mark.parametrize("family", ["mixtral-tiny", "qwen3-moe-tiny"])
@torch.no_grad()
def test_routed_hessians_are_each_experts_routed_tokens_only(family):
    _, _, block, inp = _moe_block(family)
    set_calibration(block, True)  # as the worker's plan step: every expert a group
    groups = find_input_groups(block, inp)
    set_calibration(block, False)  # hessian_tokens=routed
    experts, [(hidden, top_k_index, _)] = _expert_calls(block, inp)
    stages = [s for s in sequential_stages(block, groups) if expert_of(block, s[0]) is not None]
    sums, tokens = {}, {}
    for stage in stages:
        out = collect_stage(block, stage, [inp], StageInputs(block, [stage], frozenset(), enabled=False), 0,
                            torch.float64, torch.device("cpu"), 8)
        sums |= out.sums
        tokens |= out.tokens
    seen = 0
    for g in (g for s in stages for g in s):
        where = expert_of(block, g)
        expert = experts[where.index]
        routed = (top_k_index == where.index).any(dim=-1)  # the tokens the router sent this expert
        X = hidden[routed].double()  # [n_e, H]
        if where.role == "down":
            gate, up, _ = (getattr(expert, name).weight.double() for name in expert.names)
            X = experts.act_fn(F.linear(X, gate)) * F.linear(X, up)  # [n_e, I]
        assert tokens[g.name] == int(routed.sum())
        torch.testing.assert_close(sums[g.name], X.T @ X, rtol=1e-5, atol=1e-5)
        seen += int(routed.sum()) > 0
    assert tokens and seen >= len(experts)  # every expert was routed tokens: the test compared real Hessians
    assert sum(tokens.values()) == 2 * top_k_index.numel()  # gate/up and down: each (token, slot) once


def test_calibrate_experts_feeds_all_tokens_to_the_chosen_experts_only():
    _, _, block, inp = _moe_block("deepseek-v3-tiny")
    set_calibration(block, True)
    groups = find_input_groups(block, inp)
    set_calibration(block, False)
    experts = routed_experts(block)[0]
    seen = {}
    for e, expert in enumerate(experts):
        expert.gate_proj.register_forward_pre_hook(lambda _m, args, e=e: seen.__setitem__(e, args[0].shape[0]))
    chosen = [g for g in groups if expert_of(block, g) is not None and expert_of(block, g).index in (2, 5)]
    calibrate_experts(block, chosen)
    with torch.no_grad():
        want = block(inp.hidden, **inp.kwargs)
        n = inp.hidden.shape[0] * inp.hidden.shape[1]
        assert seen[2] == seen[5] == n and all(v < n for e, v in seen.items() if e not in (2, 5))
        calibrate_experts(block, [])
        seen.clear()
        got = block(inp.hidden, **inp.kwargs)
    assert experts.calibrate_experts == frozenset() and all(v < n for v in seen.values())
    first = (lambda x: x[0] if isinstance(x, tuple) else x)
    torch.testing.assert_close(first(got), first(want), rtol=0, atol=1e-5)  # the output stays gated


def test_an_expert_without_local_tokens_validates_on_a_sibling_experts_input_of_its_projection():
    _, _, block, inp = _moe_block("qwen3-moe-tiny")
    set_calibration(block, True)
    groups = [g for g in find_input_groups(block, inp) if expert_of(block, g) is not None]
    samples = {g.name: torch.full((2, g.in_features), float(i)) for i, g in enumerate(groups)}
    lonely = [g for g in groups if expert_of(block, g).index == 0]  # gate/up and down of expert 0
    filled = validation_samples(block, groups, {k: v for k, v in samples.items() if k not in {g.name for g in lonely}})
    assert set(filled) == set(samples)
    for g in lonely:
        sibling = next(s for s in groups if expert_of(block, s).index == 1
                       and (expert_of(block, s).role == "down") == (expert_of(block, g).role == "down"))
        assert torch.equal(filled[g.name], samples[sibling.name]) and filled[g.name].shape[1] == g.in_features


# ---- starved experts through one in-process worker ----------------------------------------------------------

STARVED = "synthetic://deepseek-v3-starved-tiny"  # block 1 on is MoE; experts 6 and 7 are never routed
SAMPLES = torch.randint(2, 1024, (4, 64), generator=torch.Generator().manual_seed(0))


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _run_blocks(moe: MoEConfig, blocks: int = 2):
    """Blocks 0 (dense) and 1 (MoE) of the starved preset on one in-process rank: block 1's result."""
    setup = WorkerSetup(job_id="test", rank=0, world_size=1, model_path=STARVED, gptq=CFG, true_sequential=True,
                        micro_batch=2, moe=moe)
    worker = BlockWorker(setup)
    try:
        worker.start(_free_address(), SAMPLES)
        for b in range(blocks):
            result = worker.run_block(BlockTask("test", b))
    finally:
        worker.stop()
    return result


@pytest.fixture(scope="module")
def starved_runs() -> dict[tuple[str, str], object]:
    return {(tokens, policy): _run_blocks(MoEConfig(starved_experts=policy, hessian_tokens=tokens))
            for tokens in ("all", "routed") for policy in ("calibrate_all", "rtn")}


def _expert_index(layer_name: str) -> int | None:
    return int(layer_name.split(".experts.")[1].split(".")[0]) if ".experts." in layer_name else None


def _packed(result, layer_name: str) -> dict[str, torch.Tensor]:
    return {f: result.tensors[f"{layer_name}.{f}"] for f in PACKED_FIELDS}


@pytest.mark.parametrize("tokens", ["all", "routed"])
def test_starved_expert_with_policy_error_stops_the_block_under_both_settings(tokens):
    with pytest.raises(StarvedExpert, match=r"block 1: .*experts\.6\.gate_proj\+up_proj': 0.*quant\.moe\.starved_experts"):
        _run_blocks(MoEConfig(starved_experts="error", hessian_tokens=tokens))


@pytest.mark.parametrize("policy", ["calibrate_all", "rtn"])
def test_starved_experts_get_the_all_token_hessian_under_routed_and_fed_ones_their_routed_tokens(policy,
                                                                                                   starved_runs):
    routed, every = starved_runs[("routed", policy)], starved_runs[("all", policy)]
    n_tokens = SAMPLES.numel()
    by_name = {x.name: x for x in every.layers}
    experts = [x for x in routed.layers if _expert_index(x.name) is not None]
    starved = [x for x in experts if _expert_index(x.name) in STARVED_EXPERTS]
    fed = [x for x in experts if x not in starved]
    assert len(starved) == 3 * len(STARVED_EXPERTS) and fed
    assert all(x.routed_tokens == 0 and x.starved_policy == policy and x.n_tokens == n_tokens for x in starved)
    # the same all-token Hessians as under `all`: the same codes and losses, bit for bit
    for x in starved:
        assert (x.gptq_loss, x.rtn_loss) == (by_name[x.name].gptq_loss, by_name[x.name].rtn_loss), x.name
        for field, tensor in _packed(routed, x.name).items():
            assert torch.equal(tensor, _packed(every, x.name)[field]), (x.name, field)
    # fed experts: Hessians over their routed tokens only (under `all`: over every token)
    assert all(0 < x.routed_tokens == x.n_tokens < n_tokens and x.starved_policy is None for x in fed)
    assert all(by_name[x.name].n_tokens == n_tokens and by_name[x.name].routed_tokens == x.routed_tokens for x in fed)
    assert all(x.gptq_loss < x.rtn_loss for x in fed)
    if policy == "calibrate_all":
        assert all(x.gptq_loss < x.rtn_loss for x in starved)
        return
    source = _source_weights([x.name for x in starved])
    for x in starved:  # rtn: the packed codes are RTN's rounding of the source weight
        written = dequantize_packed(PackedLinear(**_packed(routed, x.name)), CFG.bits).float()
        expected = rtn_weight(source[x.name], CFG)  # fp16 scales in the checkpoint: equal up to their rounding
        torch.testing.assert_close(written, expected, atol=1e-2 * float(expected.abs().max()), rtol=0)
        assert x.gptq_loss == x.rtn_loss


def _source_weights(names: list[str]) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    from rayquant.storage.model_source import open_model_source

    source = open_model_source(STARVED)
    out = {}
    for name in names:
        info = source.tensors[name + ".weight"]
        with safe_open(info.file, "pt") as f:
            out[name] = f.get_tensor(name + ".weight").float()
    return out

"""Experts in padded batches (workers/expert_padding.py, workers/expert_collect.py): a stage collected at once
gives every expert the Hessian sum, token count and validation rows that one hook per expert gives (the CPU's
path), for routed experts, every-token experts (`all`, starved) and a mix, both projections, in chunks or
whole; the padded MoE forward computes what the per-expert forward computes."""

from __future__ import annotations

import weakref

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import dequantize_packed, pack_linears
from rayquant.solver.rtn import quantize_rtn
from rayquant.workers import expert_collect, expert_padding, moe
from rayquant.workers.packed_block import install
from rayquant.workers.adapter import find_input_groups
from rayquant.workers.moe import calibrate_experts, expert_of, sequential_stages, set_calibration
from rayquant.workers import stage_collect
from rayquant.workers.stage_collect import collect_stage
from rayquant.workers.stage_inputs import StageInputs

from .test_moe import _moe_block


def _collect_experts(block, inp, stages, padded: bool, monkeypatch, device: torch.device):
    monkeypatch.setattr(stage_collect, "PADDED_DEVICES", ("cuda", "cpu") if padded else ())
    sums, tokens, samples = {}, {}, {}
    for stage in stages:
        out = collect_stage(block, stage, [inp], StageInputs(block, [stage], frozenset(), enabled=False), 0,
                            torch.float64 if device.type == "cpu" else torch.float32, device, 5)
        sums |= out.sums
        tokens |= out.tokens
        samples |= out.samples
    return sums, tokens, samples


def _expert_stages(block, inp):
    set_calibration(block, True)
    groups = find_input_groups(block, inp)
    set_calibration(block, False)
    return [s for s in sequential_stages(block, groups) if expert_of(block, s[0]) is not None]


@pytest.mark.parametrize("family", ["qwen3-moe-tiny", "deepseek-v3-starved-tiny"])
@pytest.mark.parametrize("mode", ["routed", "all", "starved_2_5"])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000])
@torch.no_grad()
def test_padded_batched_collect_equals_one_hook_per_expert(family, mode, chunk_bytes, monkeypatch):
    _, _, block, inp = _moe_block(family)
    stages = _expert_stages(block, inp)
    if mode == "all":
        set_calibration(block, True)
    elif mode == "starved_2_5":  # experts 2 and 5 see every token, the others their routed tokens
        calibrate_experts(block, [g for s in stages for g in s if expert_of(block, g).index in (2, 5)])
    monkeypatch.setattr(expert_padding, "EXPERT_CHUNK_BYTES", chunk_bytes)  # 3000: one expert per chunk
    cpu = torch.device("cpu")
    want = _collect_experts(block, inp, stages, False, monkeypatch, cpu)
    got = _collect_experts(block, inp, stages, True, monkeypatch, cpu)
    names = [g.name for s in stages for g in s]
    assert got[1] == want[1] and set(got[0]) == set(names) == set(want[0])
    if family == "deepseek-v3-starved-tiny" and mode == "routed":  # experts without tokens are skipped
        assert sum(want[1].values()) > 0 and min(want[1].values()) == 0
    for name in names:
        torch.testing.assert_close(got[0][name], want[0][name], rtol=1e-6, atol=1e-6)
    assert got[2].keys() == want[2].keys()
    for name in want[2]:
        torch.testing.assert_close(got[2][name], want[2][name], rtol=1e-6, atol=1e-6)
    if mode == "all":  # every expert saw every token
        assert set(want[1].values()) == {inp.hidden.shape[0] * inp.hidden.shape[1]}


@pytest.mark.parametrize("family", ["qwen3-moe-tiny", "mixtral-tiny", "deepseek-v3-starved-tiny"])
@pytest.mark.parametrize("chunk_bytes", [1 << 30, 3000])
@torch.no_grad()
def test_padded_forward_equals_the_per_expert_forward(family, chunk_bytes, monkeypatch):
    _, _, block, inp = _moe_block(family)
    first = (lambda x: x[0] if isinstance(x, tuple) else x)
    want = first(block(inp.hidden, **inp.kwargs))
    monkeypatch.setattr(moe, "PADDED_DEVICES", ("cuda", "cpu"))
    monkeypatch.setattr(expert_padding, "EXPERT_CHUNK_BYTES", chunk_bytes)  # 3000: one expert per chunk
    calls = []
    padded = moe.padded_forward
    monkeypatch.setattr(moe, "padded_forward", lambda *args: calls.append(1) or padded(*args))
    got = first(block(inp.hidden, **inp.kwargs))
    assert calls
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # a hook on an expert's linear (input-group probes) sees one call per expert: the per-expert path
    calls.clear()
    experts = moe.routed_experts(block)[0]
    seen = []
    hook = expert_padding.expert_linears(experts, 1)[0].register_forward_pre_hook(lambda *_: seen.append(1))
    try:
        torch.testing.assert_close(first(block(inp.hidden, **inp.kwargs)), want, rtol=0, atol=0)
    finally:
        hook.remove()
    assert not calls and seen


@torch.no_grad()
def test_padded_forward_skips_dropped_slots_and_unfed_experts(monkeypatch):
    """Router slots pointing past the last expert (dropped) and experts without tokens, as the per-expert
    forward handles them."""
    _, _, block, _ = _moe_block("deepseek-v3-tiny")
    experts = moe.routed_experts(block)[0]
    E = len(experts)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(40, experts[0].gate_proj.in_features, generator=g)
    index = torch.randint(0, E + 1, (40, 3), generator=g)
    index[index == 4] = 5  # expert 4 gets no token
    weights = torch.rand(40, 3, generator=g)
    want = experts(hidden, index, weights)
    monkeypatch.setattr(moe, "PADDED_DEVICES", ("cpu",))
    got = experts(hidden, index, weights)
    assert int((index == E).sum()) > 0
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_runs_are_index_ranges_of_consecutive_positions():
    assert expert_collect._runs([0, 1, 2, 5, 6, 9]) == [(0, 3), (3, 5), (5, 6)]
    assert expert_collect._runs([]) == []


def _standalone_experts(E: int, hidden: int, intermediate: int, device: str, dtype: torch.dtype):
    """A RoutedExperts of E random experts (no transformers model: the GPU machine's may not load one)."""
    g = torch.Generator().manual_seed(0)
    experts = [moe._Expert(("gate_proj", "up_proj", "down_proj"), hidden, intermediate, dtype) for _ in range(E)]
    for expert in experts:
        for name in expert.names:
            lin = getattr(expert, name)
            lin.weight = torch.nn.Parameter(torch.randn(lin.out_features, lin.in_features, generator=g) * 0.05,
                                            requires_grad=False)
    return moe.RoutedExperts(experts, torch.nn.SiLU()).to(device, dtype)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("role", ["gate_up", "down"])
@pytest.mark.parametrize("every_token", [False, True])
@torch.no_grad()
def test_padded_collect_on_cuda_in_bf16_is_the_per_expert_collect(role, every_token):
    """The tensor-core batched products against one product per expert on the same GPU (bf16 rows, fp32 sums)."""
    experts = _standalone_experts(32, 256, 128, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(1)
    calls = [(torch.randn(1024, 256, generator=g).to("cuda", torch.bfloat16),
              torch.randint(0, 32, (1024, 4), generator=g).cuda(),
              torch.rand(1024, 4, generator=g).to("cuda", torch.bfloat16)) for _ in range(3)]
    experts.calibrate_all = every_token
    K = 256 if role == "gate_up" else 128
    got = {}
    for padded in (False, True):
        collector = expert_collect.ExpertStageCollector(experts, list(range(32)), role,
                                                        torch.zeros(32, K, K, device="cuda"), 8, padded)
        experts.collector = collector
        for call in calls:
            with pytest.raises(expert_collect.StageCollected):
                experts(*call)
        experts.collector = None
        got[padded] = collector
    assert got[True].tokens == got[False].tokens and min(got[True].tokens) > 0
    for p in range(32):
        want = got[False].sums[p]
        err = float((torch.triu(got[True].sums[p]) - torch.triu(want)).abs().max() / want.diagonal().abs().max())
        assert err < 1e-3, (p, err)
        torch.testing.assert_close(got[True].samples[p].float(), got[False].samples[p].float(), rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@torch.no_grad()
def test_padded_forward_on_cuda_in_bf16_is_the_per_expert_forward(monkeypatch):
    experts = _standalone_experts(32, 256, 128, "cuda", torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2048, 256, generator=g).to("cuda", torch.bfloat16)
    index = torch.randint(0, 33, (2048, 4), generator=g).cuda()  # 32: a dropped slot
    weights = torch.rand(2048, 4, generator=g).to("cuda", torch.bfloat16)
    monkeypatch.setattr(moe, "PADDED_DEVICES", ())
    want = experts(hidden, index, weights)
    monkeypatch.setattr(moe, "PADDED_DEVICES", ("cuda",))
    got = experts(hidden, index, weights)
    assert float((got.float() - want.float()).norm() / want.float().norm()) < 1e-2


@torch.no_grad()
def test_experts_kept_stacked_give_the_padded_forward_and_collect_bitwise_and_take_installs_in_place(monkeypatch):
    """A GPU worker keeps each block's expert weights stacked (moe.stack_experts): a chunk of consecutive
    experts is then a view, a chunk with a gap (an unfed expert) one gather, instead of a copy per chunk and
    micro-batch. Forced onto the CPU here: the same bytes as the per-chunk copies, the block's source entries
    become the rows (held once), and installing a quantized expert writes into its row."""
    _, _, block, _ = _moe_block("deepseek-v3-tiny")
    experts = moe.routed_experts(block)[0]
    E = len(experts)
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(40, experts[0].gate_proj.in_features, generator=g)
    index = torch.randint(0, E, (40, 3), generator=g)
    index[index == 4] = 5  # expert 4 is unfed: chunks around it have a gap
    weights = torch.rand(40, 3, generator=g)
    monkeypatch.setattr(moe, "PADDED_DEVICES", ("cpu",))
    monkeypatch.setattr(expert_padding, "EXPERT_CHUNK_BYTES", 1 << 30)  # one chunk of every fed expert
    copied = experts(hidden, index, weights)
    names = {m: n for n, m in block.named_modules()}
    gate = expert_padding.expert_linears(experts, 3)[0]
    source = {f"model.layers.1.{names[gate]}.weight": gate.weight.detach()}
    old_ptr, old_weight = gate.weight.data_ptr(), weakref.ref(gate.weight)
    moe.stack_experts(block, source, "model.layers.1.")
    assert old_weight() is None  # nothing holds the expert's own tensor any more
    assert experts.stacked[0].shape == (E, *gate.weight.shape)
    assert gate.weight.data_ptr() == experts.stacked[0][3].data_ptr() != old_ptr
    assert source[f"model.layers.1.{names[gate]}.weight"].data_ptr() == gate.weight.data_ptr()  # held once
    assert torch.equal(experts(hidden, index, weights), copied)
    views = expert_padding.stacked_weights(experts, [1, 2, 3])
    assert views[0].data_ptr() == experts.stacked[0][1].data_ptr()  # consecutive: a view, no copy
    assert torch.equal(expert_padding.stacked_weights(experts, [3, 5])[2],
                       torch.stack([expert_padding.expert_linears(experts, e)[2].weight for e in (3, 5)]))
    # a quantized expert installed: written into its row, which the padded forward reads
    K = gate.weight.shape[1]
    packed = pack_linears([quantize_rtn(gate.weight * 0.5, torch.eye(K, dtype=torch.float64), 1,
                                        GPTQConfig(bits=4, group_size=K))], 4)
    install([gate], packed, torch.float32)
    assert gate.weight.data_ptr() == experts.stacked[0][3].data_ptr()
    assert torch.equal(experts.stacked[0][3], dequantize_packed(packed[0], 4))
    monkeypatch.setattr(moe, "PADDED_DEVICES", ())
    per_expert = experts(hidden, index, weights)
    monkeypatch.setattr(moe, "PADDED_DEVICES", ("cpu",))
    torch.testing.assert_close(experts(hidden, index, weights), per_expert, rtol=1e-5, atol=1e-6)

"""Stages whose input does not read the routed experts' output (the shared expert's) collect without running
them, and the worker's output stays bitwise what it was."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rayquant.workers.adapter import BlockInput, InputGroup
from rayquant.workers.moe import RoutedExperts, _Expert
from rayquant.workers.unread_experts import skipped, unread_experts

from .worker_runs import run_blocks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
H, I, E = 8, 4, 4


class _ToyMoE(nn.Module):
    """pre → router → experts; `beside` reads the block input after the experts ran, `after` their output."""

    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(H, H, bias=False)
        self.router = nn.Linear(H, E, bias=False)
        names = ("gate_proj", "up_proj", "down_proj")
        self.experts = RoutedExperts([_Expert(names, H, I, torch.float32) for _ in range(E)], nn.SiLU())
        self.beside = nn.Linear(H, H, bias=False)
        self.after = nn.Linear(H, H, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self.pre(x).reshape(-1, H)
        weights, index = torch.topk(self.router(flat).softmax(-1), 2)
        y = self.experts(flat, index, weights).view_as(x)
        return x + self.beside(x) + self.after(y)


def _toy() -> _ToyMoE:
    torch.manual_seed(0)
    block = _ToyMoE().to_empty(device="cpu")
    for p in block.parameters():
        nn.init.normal_(p)
    return block


TOY_STAGES = [[InputGroup("pre", ("pre",), H)], [InputGroup("experts.0.gate_proj+up_proj",
                                                            ("experts.0.gate_proj", "experts.0.up_proj"), H)],
              [InputGroup("beside", ("beside",), H)], [InputGroup("after", ("after",), H)]]


@torch.no_grad()
def test_only_a_stage_that_passes_the_experts_without_reading_them_skips_them():
    block = _toy()
    inp = BlockInput(torch.randn(2, 3, H), ({},))
    assert unread_experts(block, TOY_STAGES, inp) == [frozenset(), frozenset(), frozenset({"experts"}), frozenset()]
    # skipped, the experts return zeros at once: the block's output changes, `beside`'s input does not
    computed = block(inp.hidden)
    with skipped(block, frozenset({"experts"})):
        zeroed = block(inp.hidden)
    assert not torch.equal(computed, zeroed)
    assert torch.equal(zeroed, inp.hidden + block.beside(inp.hidden) + block.after(torch.zeros_like(inp.hidden)))
    assert block.experts.fill is None  # restored


def _run_blocks(preset: str, skip: bool, device: str, monkeypatch) -> tuple[list, int]:
    """Two blocks of the preset; (their results, expert computations the worker ran)."""
    computed = []
    forward = RoutedExperts.forward

    def counting(self, hidden, top_k_index, top_k_weights):
        computed.append(self.fill is None and self.collector is None)
        return forward(self, hidden, top_k_index, top_k_weights)

    monkeypatch.setattr(RoutedExperts, "forward", counting)
    return run_blocks(preset, device, n_samples=6, skip_unread_experts=skip), sum(computed)


# DeepSeek's shared expert runs after the routed experts (its block 1 is MoE): its two stages skip them
SKIPPING = {
    "deepseek-v3-tiny": {"mlp.shared_experts.gate_proj+up_proj": ["mlp.experts"],
                         "mlp.shared_experts.down_proj": ["mlp.experts"]},
    "qwen2-moe-tiny": None,  # the shared expert runs before the routed experts: nothing passes them
    "mixtral-tiny": None,  # no shared expert: nothing after the experts
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", list(SKIPPING))
def test_shared_expert_stages_skip_the_routed_experts_and_the_output_is_bitwise_the_same(
        preset, device, monkeypatch, debug_logs):
    on, computed_on = _run_blocks(preset, skip=True, device=device, monkeypatch=monkeypatch)
    logged = [e["stages"] for e in debug_logs if e["event"] == "stages_skipping_experts"]
    off, computed_off = _run_blocks(preset, skip=False, device=device, monkeypatch=monkeypatch)
    assert logged == ([SKIPPING[preset]] if SKIPPING[preset] else [])
    micro_batches = 2  # 6 samples in micro-batches of 4
    skipped_passes = len(SKIPPING[preset] or {}) * micro_batches
    assert computed_off - computed_on == skipped_passes - 1  # less the probe's one forward per structure
    for a, b in zip(on, off):
        assert a.layers == b.layers  # losses, token counts, routed tokens
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

"""The routing memo: an MoE block's routers and dispatch computed once per input while its stages collect, and
the worker's output bitwise what it was without it."""

from __future__ import annotations

import pytest
import torch

from rayquant.workers.moe import routed_experts
from rayquant.workers.routing_memo import routing_memo

from .test_moe import _moe_block
from .worker_runs import run_blocks

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@torch.no_grad()
def test_a_router_returns_its_kept_output_for_the_same_input_only():
    _, _, block, inp = _moe_block("mixtral-tiny")
    router, experts = block.get_submodule("block_sparse_moe.gate"), routed_experts(block)[0]
    x = inp.hidden.reshape(-1, inp.hidden.shape[-1]).clone()
    with routing_memo(block):
        first = router(x)
        assert router(x) is first  # the same tensor
        assert router(x.view(x.shape)) is first  # a view of it, as the MoE block makes one per call
        other = router(x[1:])  # another view of the same memory: its own output
        assert other is not first and torch.equal(other[0], first[0][1:])
        x.mul_(1.0)  # written in place: its version moved on
        again = router(x)
        assert again is not first and all(torch.equal(a, b) for a, b in zip(again, first))
        again[1].mul_(1.0)  # a caller wrote into the kept output
        assert router(x) is not again
        weights, index = first[1], first[2]
        out = experts(x, index, weights)
        assert len(experts.dispatches) == 1
        assert torch.equal(experts(x, index, weights), out) and len(experts.dispatches) == 1  # reused
    assert "forward" not in vars(router) and experts.dispatches is None  # the class's forward again
    assert torch.equal(experts(x, index, weights), out)


def _run_blocks(preset: str, memo: bool, device: str, monkeypatch) -> tuple[list, int]:
    """Two blocks of the preset; (their results, the router forwards computed)."""
    _, _, block, _ = _moe_block(preset)
    router_class = type(block.get_submodule(next(n for n, _ in block.named_modules() if n.endswith(".gate"))))
    computed = []
    forward = router_class.forward

    def counting(self, *args, **kwargs):
        computed.append(1)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(router_class, "forward", counting)
    return run_blocks(preset, device, n_samples=10, memo_routing=memo), len(computed)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", ["deepseek-v3-tiny", "mixtral-tiny", "qwen3-moe-tiny"])
def test_routing_memo_leaves_the_output_bitwise_and_routes_each_input_once(preset, device, monkeypatch):
    on, routed_on = _run_blocks(preset, memo=True, device=device, monkeypatch=monkeypatch)
    off, routed_off = _run_blocks(preset, memo=False, device=device, monkeypatch=monkeypatch)
    assert 0 < routed_on < routed_off
    for a, b in zip(on, off):
        assert a.layers == b.layers  # losses, token counts, routed tokens
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)

"""Collect: one true_sequential stage's Hessian sums Σxᵀx over this rank's calibration shard (DESIGN.md §5).

A pre-hook on each input group's first linear adds xᵀx of its input and keeps the first rows for kernel
validation. The forward stops at the stage's last input group (what follows is not needed yet); where the
stage lies inside a child whose calls an earlier stage recorded, only that child runs (§5.2). A stage of
experts (one projection of experts of one MoE block) takes no hook per expert: its experts module hands each
forward's dispatch to an `ExpertStageCollector` (workers/expert_collect.py), which sums them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rayquant.solver.hessian import accumulate_hessian, mirror_upper
from rayquant.workers.adapter import BlockInput, InputGroup, forward_block
from rayquant.workers.child_memo import ChildMemo, memo_micro_batch, memo_pass
from rayquant.workers.expert_collect import ExpertStageCollector, StageCollected
from rayquant.workers.expert_padding import PADDED_DEVICES
from rayquant.workers.moe import expert_stage
from rayquant.workers.stage_inputs import StageInputs


class _StageCollected(Exception):
    """Raised by the last Hessian hook of a stage to end the forward pass early."""


@dataclass
class CollectedStage:
    """Per input group of the stage, from this rank's shard."""

    sums: dict[str, torch.Tensor]  # Σxᵀx [K, K], mirrored (full, not upper)
    tokens: dict[str, int]  # rows of x summed
    samples: dict[str, torch.Tensor]  # the first rows of x [≤ validate_tokens, K], for kernel validation


def collect_stage(block: nn.Module, stage: list[InputGroup], inputs: list[BlockInput], stage_inputs: StageInputs,
                  stage_idx: int, hessian_dtype: torch.dtype, device: torch.device,
                  validate_tokens: int, memo: ChildMemo | None = None) -> CollectedStage:
    """Forward `inputs` (or the recorded child calls) through `block` with Hessian hooks on `stage`'s groups;
    `memo` keeps its children's last-linear inputs and shortcuts its complete children (workers/child_memo.py)."""
    experts = expert_stage(block, stage)
    collector = None
    if experts is not None:
        module, indices, role = experts
        K = stage[0].in_features
        collector = ExpertStageCollector(module, indices, role,
                                         torch.zeros(len(stage), K, K, dtype=hessian_dtype, device=device),
                                         validate_tokens, padded=device.type in PADDED_DEVICES)
        out = CollectedStage(sums={g.name: collector.sums[p] for p, g in enumerate(stage)}, tokens={}, samples={})
        module.collector, hooks = collector, []
    else:
        out = CollectedStage(
            sums={g.name: torch.zeros(g.in_features, g.in_features, dtype=hessian_dtype, device=device)
                  for g in stage},
            tokens={g.name: 0 for g in stage}, samples={})
        hooks = [_hessian_hook(block, g, out, validate_tokens, last=g is stage[-1]) for g in stage]
    if memo is not None:
        hooks += memo.keep_hooks(stage_idx)
    replay = stage_inputs.recorded(stage_idx, len(inputs))
    if replay is None:
        hooks += stage_inputs.record(stage_idx)  # for the next stage, if it lies in the same child
    try:
        with memo_pass(memo, len(inputs)):
            if replay is not None:
                child, calls = replay
                for k, call in enumerate(calls):
                    with memo_micro_batch(memo, k):
                        _until_collected(child, *call.args, **call.kwargs)
            else:
                for k, inp in enumerate(inputs):
                    with memo_micro_batch(memo, k):
                        _until_collected(forward_block, block, inp)
    finally:
        for h in hooks:
            h.remove()
        if collector is not None:
            collector.module.collector = None
    if collector is not None:
        out.tokens = {g.name: collector.tokens[p] for p, g in enumerate(stage)}
        out.samples = {g.name: collector.samples[p] for p, g in enumerate(stage) if p in collector.samples}
    stage_inputs.done(stage_idx)
    for hessian_sum in out.sums.values():
        mirror_upper(hessian_sum)
    return out


def _hessian_hook(block: nn.Module, g: InputGroup, out: CollectedStage, validate_tokens: int,
                  last: bool) -> RemovableHandle:
    def record(_mod: nn.Module, args: tuple) -> None:
        x = args[0]
        out.tokens[g.name] += accumulate_hessian(out.sums[g.name], x, mirror=False)  # mirrored once, at the end
        if g.name not in out.samples:
            out.samples[g.name] = x.reshape(-1, x.shape[-1])[:validate_tokens].clone()
        if last:
            raise _StageCollected

    return block.get_submodule(g.linears[0]).register_forward_pre_hook(record)


def _until_collected(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except (_StageCollected, StageCollected):
        pass


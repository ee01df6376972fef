"""The plan step of a block (DESIGN.md §5): the block materialized from its source tensors, its input groups'
owners, its true_sequential stages, and what spares later passes work — the stage-replay inputs (§5.2), the
child memo (§5.2.1) and the experts each stage skips (§7).

Blocks of one structure group their linears alike: the probe forwards that find the input groups, the
children one forward calls once and the experts a stage does not read run once per structure, not per block.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from rayquant.workers.adapter import BlockInput, InputGroup, find_input_groups, materialize
from rayquant.workers.child_memo import ChildMemo
from rayquant.workers.moe import sequential_stages, set_calibration, stack_experts
from rayquant.workers.rank_group import balance
from rayquant.workers.stage_inputs import StageInputs, once_called_children
from rayquant.workers.stage_solve import solve_cost
from rayquant.workers.unread_experts import unread_experts

log = structlog.get_logger()


@dataclass(frozen=True)
class PlanOptions:
    """The worker's settings the plan reads (the three switches: benchmarks and tests compare both ways)."""

    dtype: torch.dtype  # the block's weights and activations
    hessian_dtype: torch.dtype
    device: torch.device
    world: int
    true_sequential: bool
    hessian_tokens: str  # quant.moe.hessian_tokens
    stage_shortcut: bool
    child_memo: bool
    skip_unread_experts: bool


@dataclass(frozen=True)
class BlockPlan:
    """What the plan step decides for one block."""

    block: nn.Module  # materialized in the worker dtype; each stage installs its quantized linears
    owners: dict[str, int]  # input group -> the rank that solves it whole (balanced by solve_cost)
    stages: list[list[InputGroup]]  # true_sequential stages (one without), in forward order
    stage_inputs: StageInputs  # recorded child calls for the stage-replay shortcut
    unread: list[frozenset[str]]  # per stage, the RoutedExperts its collect skips (workers/unread_experts.py)
    memo: ChildMemo  # the block's child memo, placed


@dataclass(frozen=True)
class _StructureFacts:
    groups: list[InputGroup]
    once_called: frozenset[str]  # children one block forward calls once


# (block, its structure, the memo's planned bytes) -> "device", "host" or None: where the child memo lives
MemoPlacement = Callable[[nn.Module, tuple, int], str | None]


class BlockPlanner:
    """One worker's plans, with what it learnt per block structure."""

    def __init__(self, rank: int):
        self.rank = rank
        self._facts: dict[tuple, _StructureFacts] = {}
        self._unread: dict[tuple, list[frozenset[str]]] = {}

    def plan(self, skeleton: nn.Module, source: dict[str, torch.Tensor], prefix: str, inputs: list[BlockInput],
             options: PlanOptions, memo_placement: MemoPlacement) -> BlockPlan:
        """Materialize `skeleton` from `source` (full names under `prefix`) and plan its stages on this rank's
        calibration `inputs` (the first micro-batch probes a new structure)."""
        block = materialize(skeleton, {n[len(prefix):]: t for n, t in source.items()}, options.dtype)
        stack_experts(block, source, prefix)  # GPU: expert chunks are views, not copies, in every later pass
        set_calibration(block, True)  # MoE: every expert sees every token, so every expert is a group
        signature = structure(block)
        if signature not in self._facts:
            self._facts[signature] = _StructureFacts(find_input_groups(block, inputs[0]),
                                                     once_called_children(block, inputs[0]))
        facts = self._facts[signature]
        stages = (sequential_stages(block, facts.groups, options.hessian_tokens, options.hessian_dtype.itemsize)
                  if options.true_sequential else [facts.groups])
        unread = self._unread_experts(block, signature, stages, inputs[0], options.skip_unread_experts)
        memo = ChildMemo(block, stages, facts.once_called, options.device, enabled=options.child_memo,
                         signature=signature)
        memo.place(memo_placement(block, signature, memo.planned_bytes(inputs)))
        owners = balance({g.name: solve_cost(block, g) for g in facts.groups}, options.world)
        return BlockPlan(block=block, owners=owners, stages=stages,
                         stage_inputs=StageInputs(block, stages, facts.once_called, options.stage_shortcut),
                         unread=unread, memo=memo)

    def _unread_experts(self, block: nn.Module, signature: tuple, stages: list[list[InputGroup]],
                        inp: BlockInput, enabled: bool) -> list[frozenset[str]]:
        if not enabled:
            return [frozenset()] * len(stages)
        if signature not in self._unread:
            unread = unread_experts(block, stages, inp)
            self._unread[signature] = unread
            if any(unread):
                log.debug("stages_skipping_experts", rank=self.rank,
                          stages={s[0].name: sorted(u) for s, u in zip(stages, unread) if u})
        return self._unread[signature]


def structure(block: nn.Module) -> tuple:
    """What decides a block's input groups: its modules' names and classes and its parameters' shapes."""
    return (tuple((name, type(mod).__name__) for name, mod in block.named_modules()),
            tuple((name, tuple(p.shape)) for name, p in block.named_parameters()))

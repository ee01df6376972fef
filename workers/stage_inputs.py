"""A block child's recorded calls, so a true_sequential stage need not run the block forward again.

`BlockWorker._collect` runs the whole block forward for every sub-stage and stops at the stage's
last input group. When every linear of a stage and of the stage after it lies inside one direct
child C of the block (Llama: `self_attn` for [q,k,v] → [o], `mlp` for [gate,up] → [down]) and one
block forward calls C exactly once, C's input is the same for both stages: what changes between
them is the weights of the first stage's linears, and those lie inside C. So the first stage records
C's call (args and kwargs, per micro-batch) and the next stages of C run C on it instead of the
block: the same ops on the same tensors, hence bitwise the same Hessians, without recomputing what
precedes C (for `mlp`: the whole attention). Which children qualify comes from the module tree and
a probe forward, never from names; the recorded calls are dropped after the last stage of C.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rayquant.workers.adapter import BlockInput, InputGroup, forward_block
from rayquant.workers.moe import routed_experts


@dataclass(frozen=True)
class ChildCall:
    """One micro-batch's call of the child, as the block forward made it."""

    args: tuple
    kwargs: dict[str, Any]
    versions: tuple[int, ...]  # version counters of every tensor in args/kwargs when the call began


def once_called_children(block: nn.Module, inp: BlockInput) -> frozenset[str]:
    """Names of the block's direct children that one block forward calls exactly once (a probe forward)."""
    calls: Counter[str] = Counter()
    hooks = []
    for name, child in block.named_children():
        def count(_mod: nn.Module, _args: tuple, name: str = name) -> None:
            calls[name] += 1
        hooks.append(child.register_forward_pre_hook(count))
    try:
        forward_block(block, inp)
    finally:
        for h in hooks:
            h.remove()
    return frozenset(name for name, n in calls.items() if n == 1)


def stage_holder(stage: list[InputGroup]) -> str | None:
    """The direct child of the block that holds every linear of the stage, or None (a linear that is
    itself a child, such as OPT's fc1, is held by none: its stage has nothing before it to skip)."""
    heads = {lin.split(".", 1)[0] if "." in lin else None for g in stage for lin in g.linears}
    return heads.pop() if len(heads) == 1 else None


class StageInputs:
    """One block's stages: which run on a child's recorded calls, and the calls while they are needed.

    Per stage i, in order: `recorded(i, n)` gives the calls to replay (else run the block forward),
    `record(i)` hooks the child during that forward when stage i+1 lies in the same child, and
    `done(i)` drops the calls once no later stage needs them.
    """

    def __init__(self, block: nn.Module, stages: list[list[InputGroup]], once_called: frozenset[str],
                 enabled: bool = True):
        self.block = block
        holders = [stage_holder(s) for s in stages] if enabled else [None] * len(stages)
        self.holders = [h if h in once_called else None for h in holders]
        self.child: str | None = None  # whose calls `calls` holds
        self.calls: list[ChildCall] = []
        self.outside: tuple[bool, ...] = ()  # MoE calibration flags outside the child when it was recorded
        self.replayed: list[int] = []  # stages that ran on recorded calls

    def recorded(self, i: int, n_micro_batches: int) -> tuple[nn.Module, list[ChildCall]] | None:
        """The child and its recorded calls if stage i can run on them, else None (run the block forward)."""
        if self.child is None or self.holders[i] != self.child or len(self.calls) != n_micro_batches:
            return None
        # the block forward would recompute the child's input from the same weights, unless something
        # changed it since: an in-place write into a recorded tensor, or MoE calibration mode ahead of it
        if any(call.versions != _versions(call.args, call.kwargs) for call in self.calls):
            return None
        if self.outside != self._outside_flags(self.child):
            return None
        self.replayed.append(i)
        return self.block.get_submodule(self.child), self.calls

    def record(self, i: int) -> list[RemovableHandle]:
        """Record the child's calls during stage i's block forward if stage i+1 lies in the same child."""
        self.child, self.calls = None, []
        if not self._next_shares_child(i):
            return []
        self.child = self.holders[i]
        self.outside = self._outside_flags(self.child)

        def keep(_mod: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
            self.calls.append(ChildCall(args, dict(kwargs), _versions(args, kwargs)))
        return [self.block.get_submodule(self.child).register_forward_pre_hook(keep, with_kwargs=True)]

    def done(self, i: int) -> None:
        """Stage i has collected: drop the calls unless stage i+1 runs on them (at 405B they are ~9 GB)."""
        if not self._next_shares_child(i):
            self.child, self.calls = None, []

    def _next_shares_child(self, i: int) -> bool:
        return self.holders[i] is not None and i + 1 < len(self.holders) and self.holders[i + 1] == self.holders[i]

    def _outside_flags(self, child: str) -> tuple[bool, ...]:
        inside = {id(m) for m in self.block.get_submodule(child).modules()}
        return tuple(m.calibrate_all for m in routed_experts(self.block) if id(m) not in inside)


def _versions(args: tuple, kwargs: dict[str, Any]) -> tuple[int, ...]:
    return tuple(t._version for t in _tensors((args, kwargs)))


def _tensors(value: Any) -> list[torch.Tensor]:
    """Every tensor inside nested tuples, lists and dicts, in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    return []

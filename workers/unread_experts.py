"""Routed experts whose output a stage's input never reads: that stage's forwards skip them.

DeepSeek-V2/V3 add a shared expert to the routed experts' sum, called after them (Qwen2-MoE calls its
own first). Its linears come after every routed expert's in forward order, so its two true_sequential
stages each forward the whole routed-expert module (at DeepSeek-V3 every micro-batch's 2 M (token, slot)
pairs through 256 experts) for an output the shared expert's input, the MoE block's input, does not
depend on. During such a stage's collect the
experts module returns zeros at once (`RoutedExperts.fill`): the stage's inputs are the same tensors.

Which stages read which experts module comes from a probe, never from names: once per block structure,
micro-batch 0 goes through the block with hooks that keep the first input group's input of every stage
outside the experts, once as the model computes it and once with each experts module's output replaced
by ones. A stage skips a module that ran before its input was first taken and whose replaced output left
its inputs bitwise the same. A stage the forward reaches before the module (attention) has nothing to
skip; one whose input the forward never reaches (none kept) counts as reading it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from rayquant.workers.adapter import BlockInput, InputGroup, forward_block
from rayquant.workers.moe import RoutedExperts, expert_of


def unread_experts(block: nn.Module, stages: list[list[InputGroup]], inp: BlockInput) -> list[frozenset[str]]:
    """Per stage, the paths (relative to the block) of the RoutedExperts modules its input does not read;
    empty for a stage of experts and in blocks without experts."""
    named = [(name, m) for name, m in block.named_modules() if isinstance(m, RoutedExperts)]
    probed = [i for i, s in enumerate(stages) if all(expert_of(block, g) is None for g in s)]
    if not named or not probed:
        return [frozenset()] * len(stages)
    paths = {id(m): name for name, m in named}
    modules = [m for _, m in named]
    flags = [(m.calibrate_all, m.calibrate_experts) for m in modules]
    for m in modules:  # the probe forwards each expert's routed tokens only
        m.calibrate_all, m.calibrate_experts = False, frozenset()
    try:
        computed, passed = _stage_inputs(block, stages, probed, inp, modules)
        unread: list[set[str]] = [set() for _ in stages]
        for module in (m for m in modules if any(id(m) in passed[i] for i in probed)):
            with filled(module, 1.0):
                replaced, _ = _stage_inputs(block, stages, probed, inp, modules)
            for i in probed:
                if id(module) in passed[i] and len(computed[i]) == len(replaced[i]) and all(
                        torch.equal(a, b) for a, b in zip(computed[i], replaced[i])):
                    unread[i].add(paths[id(module)])
    finally:
        for m, (every, chosen) in zip(modules, flags):
            m.calibrate_all, m.calibrate_experts = every, chosen
    return [frozenset(u) for u in unread]


@contextlib.contextmanager
def skipped(block: nn.Module, paths: frozenset[str]) -> Iterator[None]:
    """The RoutedExperts at `paths` return zeros instead of computing while the body runs."""
    with contextlib.ExitStack() as stack:
        for path in sorted(paths):
            stack.enter_context(filled(block.get_submodule(path), 0.0))
        yield


@contextlib.contextmanager
def filled(module: RoutedExperts, value: float) -> Iterator[None]:
    module.fill = value
    try:
        yield
    finally:
        module.fill = None


def _stage_inputs(block: nn.Module, stages: list[list[InputGroup]], probed: list[int], inp: BlockInput,
                  modules: list[RoutedExperts]) -> tuple[dict[int, list[torch.Tensor]], dict[int, frozenset[int]]]:
    """Over one whole block forward: every call's input of each probed stage's first input group, and the
    experts modules (ids) that had run when that input was first taken."""
    kept: dict[int, list[torch.Tensor]] = {i: [] for i in probed}
    ran: set[int] = set()
    passed: dict[int, frozenset[int]] = {}
    hooks = [m.register_forward_pre_hook(lambda mod, _args: ran.add(id(mod))) for m in modules]
    for i in probed:
        def keep(_mod: nn.Module, args: tuple, i: int = i) -> None:
            passed.setdefault(i, frozenset(ran))
            kept[i].append(args[0].detach().clone())
        hooks.append(block.get_submodule(stages[i][0].linears[0]).register_forward_pre_hook(keep))
    try:
        forward_block(block, inp)
    finally:
        for h in hooks:
            h.remove()
    return kept, {i: passed.get(i, frozenset()) for i in probed}

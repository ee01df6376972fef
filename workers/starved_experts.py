"""MoE: the calibration tokens the router sent each expert, and what an expert sent too few gets (DESIGN.md §7).

Under quant.moe.hessian_tokens=routed a starved expert's Hessians (from its few routed tokens) are
replaced by all-token ones, collected again with every token through just those experts, before the
reduce: calibrate_all then solves GPTQ on them and rtn reports its losses against them, as under `all`.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog
import torch
from torch import nn

from rayquant.workers.adapter import InputGroup
from rayquant.workers.moe import MoEConfig, StarvedExpert, calibrate_experts, expert_of, local_routed_tokens
from rayquant.workers.rank_group import RankGroup
from rayquant.workers.stage_collect import CollectedStage

log = structlog.get_logger()


def routed_tokens(group: RankGroup, block_idx: int, block: nn.Module, stage: list[InputGroup],
                  cfg: MoEConfig) -> dict[str, int]:
    """Calibration tokens the router sent to each expert input group of the stage, summed over ranks.

    Raises:
        StarvedExpert: an expert is below quant.moe.min_tokens and the policy is error (every rank alike).
    """
    experts = [g for g in stage if expert_of(block, g) is not None]
    if not experts:
        return {}
    counts = torch.tensor([local_routed_tokens(block, g) for g in experts], dtype=torch.int64, device=group.device)
    routed = {g.name: int(c) for g, c in zip(experts, group.sum_counts(counts).tolist())}
    starved = {name: n for name, n in routed.items() if n < cfg.min_tokens}
    if starved:
        log.warning("experts_starved", experts=starved, min_tokens=cfg.min_tokens, policy=cfg.starved_experts)
    if starved and cfg.starved_experts == "error":
        raise StarvedExpert(
            f"block {block_idx}: the router sent fewer than quant.moe.min_tokens={cfg.min_tokens} calibration "
            f"tokens to {starved}; set quant.moe.starved_experts to calibrate_all or rtn, or raise "
            "calibration.n_samples")
    return routed


def starved_policy(n_routed: int | None, cfg: MoEConfig) -> str | None:
    """quant.moe.starved_experts for an expert routed fewer than min_tokens (`n_routed`; None: not an expert);
    None otherwise."""
    starved = n_routed is not None and n_routed < cfg.min_tokens
    return cfg.starved_experts if starved else None


def recollect_starved(block: nn.Module, stage: list[InputGroup], routed: dict[str, int], cfg: MoEConfig,
                      collected: CollectedStage, collect: Callable[[list[InputGroup]], CollectedStage]) -> None:
    """Under hessian_tokens=routed, replace the starved experts' sums, token counts and samples in `collected`
    by an all-token collect of just their groups (`collect`). Every rank takes the same branch: `routed` is
    summed over ranks. Under `all` their Hessians are all-token already."""
    starved = [g for g in stage if routed.get(g.name, cfg.min_tokens) < cfg.min_tokens]
    if cfg.hessian_tokens != "routed" or not starved:
        return
    calibrate_experts(block, starved)
    try:
        again = collect(starved)
    finally:
        calibrate_experts(block, [])
    collected.sums |= again.sums
    collected.tokens |= again.tokens
    collected.samples |= again.samples


def validation_samples(block: nn.Module, stage: list[InputGroup], samples: dict[str, torch.Tensor]) -> dict[
        str, torch.Tensor]:
    """`samples` with every stage group present: under hessian_tokens=routed an expert this rank's shard
    routed no token to has none of its own, and validates its kernel on a sibling expert's input of the
    same projection (a real input of that width; the other ranks' tokens never reach this one)."""
    out = dict(samples)
    for g in stage:
        where = expert_of(block, g)
        if g.name in out or where is None:
            continue
        siblings = [s for s in stage if s.name in samples and (w := expert_of(block, s)) is not None
                    and (w.experts_path, w.role == "down") == (where.experts_path, where.role == "down")]
        if siblings:
            out[g.name] = samples[siblings[0].name]
    return out

"""MoE: the calibration tokens the router sent each expert, and what an expert sent too few gets (DESIGN.md §7)."""

from __future__ import annotations

import structlog
import torch
from torch import nn

from rayquant.workers.adapter import InputGroup
from rayquant.workers.moe import MoEConfig, StarvedExpert, expert_of, local_routed_tokens
from rayquant.workers.rank_group import RankGroup

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

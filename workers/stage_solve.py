"""Solve: the input groups (or row slices) one rank solves in one true_sequential stage, batched.

Per GPTQConfig, every group this rank solves goes into one `solve_input_groups` call: an MoE stage's
experts sharing one all-token Hessian are one stacked solve, experts with Hessians of their own one
batched solve (DESIGN.md §5.4, §7). The report's RTN baseline (`quantize_rtn_many`) and the kernel
validation of the packed layers (`validate_packed_layers`) are batched the same way, so a 128-expert
stage costs a few large calls instead of hundreds of small ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from rayquant.kernels.dequant_gemm import dequant_gemm
from rayquant.kernels.validation import KernelMismatch, validate_packed_layers
from rayquant.solver.gptq import (GPTQConfig, GPTQResult, GroupProblem, HessianNotPositiveDefinite, dequantize,
                                  solve_input_groups)
from rayquant.solver.pack import PackedLinear
from rayquant.solver.rtn import quantize_rtn_many
from rayquant.storage.job_records import LayerReport
from rayquant.workers.adapter import InputGroup
from rayquant.workers.moe import MoEConfig
from rayquant.workers.stage_timing import StageClock
from rayquant.workers.starved_experts import starved_policy

log = structlog.get_logger()


@dataclass(frozen=True)
class GroupWork:
    """One input group's linears (of one config) this rank solves, and what it solves them against."""

    group: InputGroup  # the linears solved here (all of `cfg`)
    rows: dict[str, tuple[int, int]] | None  # each linear's output rows [start, stop); None: all rows
    cfg: GPTQConfig
    hessian_sum: torch.Tensor  # Σxᵀx, reduced; one tensor object where experts share it
    n_tokens: int
    x_val: torch.Tensor  # the group's first input rows, for kernel validation
    routed_tokens: int | None  # MoE experts: calibration tokens routed to it; None elsewhere


@dataclass(frozen=True)
class SolveSettings:
    rank: int
    prefix: str  # the block's checkpoint prefix, for layer names
    block_idx: int
    moe: MoEConfig
    validate_tolerance: float
    pack: Callable[[list[GPTQResult], int], list[PackedLinear]]  # GPTQ v1 packing of many linears (tests corrupt it)


def solve_groups(block: torch.nn.Module, works: list[GroupWork], settings: SolveSettings,
                 clock: StageClock) -> tuple[dict[str, PackedLinear], list[list[LayerReport]]]:
    """GPTQ on every work's linears, then the RTN baseline and the kernel validation; returns the packed
    linears (or row slices) by linear and, per work, its reports (one per linear).

    Raises:
        HessianNotPositiveDefinite, KernelMismatch: naming the block and the input group or layer.
    """
    weights = [_weights(block, w) for w in works]
    results: list[list[GPTQResult]] = [[] for _ in works]
    baselines: list[list[GPTQResult]] = [[] for _ in works]
    for cfg in dict.fromkeys(w.cfg for w in works):  # overrides may give groups other configs
        mine = [i for i, w in enumerate(works) if w.cfg == cfg]
        with clock.timed("solve"):
            try:
                solved = solve_input_groups([GroupProblem(weights[i], works[i].hessian_sum, works[i].n_tokens)
                                             for i in mine], cfg)
            except HessianNotPositiveDefinite as err:
                group = works[mine[err.group]].group.name if err.group is not None else "?"
                raise HessianNotPositiveDefinite(f"block {settings.block_idx} input group {group}: {err}") from err
        with clock.timed("baseline"):  # the report's RTN loss
            flat = [(i, w) for i in mine for w in weights[i]]
            rtn = quantize_rtn_many([w for _, w in flat], [works[i].hessian_sum for i, _ in flat],
                                    [works[i].n_tokens for i, _ in flat], cfg)
        for i, res in zip(mine, solved):
            results[i] = res
        for (i, _), base in zip(flat, rtn):
            baselines[i].append(base)
    policies = [starved_policy(w.routed_tokens, settings.moe) for w in works]
    for i, policy in enumerate(policies):
        if policy == "rtn":
            results[i] = baselines[i]  # a starved expert gets RTN's codes; both losses still use its H
    with clock.timed("validate"):
        packed, reports = _pack_and_validate(works, weights, results, baselines, policies, settings)
    return packed, reports


def _dequantize_many(results: list[GPTQResult]) -> list[torch.Tensor]:
    """The solver's weights of every result (the validation's expected), one call per shape: elementwise,
    so bitwise each result's own dequantize."""
    out: list[torch.Tensor | None] = [None] * len(results)
    by_shape: dict[tuple, list[int]] = {}
    for i, r in enumerate(results):
        by_shape.setdefault((r.codes.shape, r.scales.shape, r.codes.device), []).append(i)
    for same in by_shape.values():
        per_chunk = max(1, DEQUANTIZE_CHUNK_BYTES // (4 * results[same[0]].codes.numel()))
        for members in (same[c:c + per_chunk] for c in range(0, len(same), per_chunk)):
            parts = [results[i] for i in members]
            stacked = dequantize(*(torch.stack([getattr(r, f) for r in parts])
                                   for f in ("codes", "scales", "zeros", "g_idx")))
            for i, w in zip(members, stacked.unbind(0)):
                out[i] = w
    return out


DEQUANTIZE_CHUNK_BYTES = 1 << 30  # float32 weights one dequantize call makes (its temporaries are twice that)


def _weights(block: torch.nn.Module, work: GroupWork) -> list[torch.Tensor]:
    """The work's weights [N_i, K] (its rows), as the block holds them: the solver converts them a chunk at a time."""
    weights = [block.get_submodule(lin).weight for lin in work.group.linears]
    if work.rows is not None:
        weights = [w[work.rows[lin][0]:work.rows[lin][1]] for lin, w in zip(work.group.linears, weights)]
    return weights


def _pack_and_validate(works: list[GroupWork], weights: list[list[torch.Tensor]], results: list[list[GPTQResult]],
                       baselines: list[list[GPTQResult]], policies: list[str | None],
                       settings: SolveSettings) -> tuple[dict[str, PackedLinear], list[list[LayerReport]]]:
    """Pack every linear, validate the packed layers against the solver's weights in batched kernel calls,
    and write the reports."""
    layers = [(i, lin, res) for i, w in enumerate(works) for lin, res in zip(w.group.linears, results[i])]
    bits = {w.cfg.bits for w in works}
    packed = {}
    for b in bits:  # one batched packing per bit width
        of_bits = [(lin, res) for i, lin, res in layers if works[i].cfg.bits == b]
        packed.update(zip([lin for lin, _ in of_bits], settings.pack([res for _, res in of_bits], b)))
    checks = {}
    for b in bits:  # one batched validation per bit width
        of_bits = [(i, lin, res) for i, lin, res in layers if works[i].cfg.bits == b]
        try:
            found = validate_packed_layers(
                shared_inputs([works[i].x_val for i, _, _ in of_bits]), [packed[lin] for _, lin, _ in of_bits], b,
                _dequantize_many([res for _, _, res in of_bits]),
                settings.validate_tolerance, gemm=dequant_gemm, names=[settings.prefix + lin for _, lin, _ in of_bits])
        except KernelMismatch as err:
            raise KernelMismatch(f"block {settings.block_idx} layer {err}") from err
        checks.update({lin: check for (_, lin, _), check in zip(of_bits, found)})
    reports: list[list[LayerReport]] = [[] for _ in works]
    for i, work in enumerate(works):
        for lin, w, res, base in zip(work.group.linears, weights[i], results[i], baselines[i]):
            reports[i].append(LayerReport(
                name=settings.prefix + lin, input_group=work.group.name, in_features=w.shape[1],
                out_features=w.shape[0], gptq_loss=res.loss, rtn_loss=base.loss, damp_percent=res.damp_percent,
                n_tokens=work.n_tokens, owner=settings.rank, max_rel_err=checks[lin].max_rel_err,
                mean_rel_err=checks[lin].mean_rel_err, routed_tokens=work.routed_tokens, starved_policy=policies[i],
            ))
            log.debug("layer_solved", rank=settings.rank, layer=settings.prefix + lin, loss=res.loss,
                      rtn_loss=base.loss, damp_percent=res.damp_percent)
    return packed, reports


def shared_inputs(xs: list[torch.Tensor]) -> list[torch.Tensor]:
    """One validation input per in_features for every layer of that width: rows taken evenly from every
    distinct input of that width (each expert's own), as many as the largest has. Layers of one width then
    share their activations, so an MoE stage's experts validate in one kernel call per shape, joined along
    the output dim (`validate_packed_layers`), on real inputs of their projection, instead of one call each
    (or one call computing E× the products it reads)."""
    distinct: dict[int, list[torch.Tensor]] = {}
    for x in xs:
        seen = distinct.setdefault(x.shape[-1], [])
        if not any(x is y for y in seen):
            seen.append(x)
    mixed = {}
    for width, inputs in distinct.items():
        if len(inputs) == 1:
            mixed[width] = inputs[0]
            continue
        rows = torch.cat(inputs)
        n = max(x.shape[0] for x in inputs)
        mixed[width] = rows[torch.linspace(0, rows.shape[0] - 1, n, device=rows.device).long()]
    return [mixed[x.shape[-1]] for x in xs]


def solve_cost(block: torch.nn.Module, group: InputGroup) -> int:
    """Flops of solving `group` up to a constant, to balance owners by work rather than by group count: a
    Cholesky of its K×K Hessian (K³/3) and the column loop's lazy updates over its rows (N·K²)."""
    K = group.in_features
    rows = sum(block.get_submodule(lin).out_features for lin in group.linears)
    return K * K * (K // 3 + rows)

"""Who solves what in one true_sequential stage: each input group's owner, or every rank a row slice.

The choice is made once per stage (`stage_strategy`, DESIGN.md §5.3); both strategies give the stage loop
the same four steps: `reduce` (the summed Hessians where they are solved), `assign` (which linears and rows
this rank solves), `share` (every rank gets the whole packed layer) and `layer_reports` (one per linear).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import OUTPUT_DIM, PACKED_FIELDS, PackedLinear, concat_packed, packed_shapes
from rayquant.storage.job_records import LayerReport
from rayquant.workers.adapter import InputGroup
from rayquant.workers.collectives import gather_sum, sum_to_all_
from rayquant.workers.rank_group import RankGroup, nbytes
from rayquant.workers.row_split import row_bounds

Reduced = dict[str, tuple[torch.Tensor, int] | None]  # per input group: (Σxᵀx, n_tokens); None where not solved


@dataclass(frozen=True)
class Assignment:
    """What this rank solves of one input group under one config."""

    group: InputGroup  # the linears solved here (a subset of the input group's)
    rows: dict[str, tuple[int, int]] | None  # each linear's output rows [start, stop); None: all rows


def stage_strategy(group: RankGroup, stage: list[InputGroup], aliases: dict[str, str], owners: dict[str, int],
                   split_rows: bool) -> OwnerStage | RowSplitStage:
    """Row split where the stage has fewer input groups than ranks (every true_sequential stage of a dense
    model at W ≥ 2) and `split_rows` is on; MoE stages whose experts share a Hessian keep owners."""
    if split_rows and group.world > 1 and len(stage) < group.world and not aliases:
        return RowSplitStage(group)
    return OwnerStage(group, owners)


class OwnerStage:
    """Each input group is solved whole by its owner (`owners`, balanced over the block's groups)."""

    def __init__(self, group: RankGroup, owners: dict[str, int]):
        self.group, self.owners = group, owners
        self.reports: list[LayerReport] = []  # of the groups this rank owns

    def reduce(self, sums: dict[str, torch.Tensor], tokens: dict[str, int], aliases: dict[str, str]) -> Reduced:
        """Each collected group's sum on its owner; an MoE Hessian shared by several groups (`aliases`:
        group -> the collected group) goes to every rank, since their owners differ."""
        reduced = {name: self._sum_on_owner(sums[name], tokens[name], self.owners[name]) for name in sums}
        for first in sorted(set(aliases.values())):  # the same order on every rank
            reduced[first] = self._share_hessian(reduced[first], self.owners[first], sums[first])
        for name, first in aliases.items():
            reduced[name] = reduced[first]
        return reduced

    def assign(self, block: nn.Module, group: InputGroup, linears: tuple[str, ...]) -> Assignment | None:
        if self.owners[group.name] != self.group.rank:
            return None
        return Assignment(InputGroup(name=group.name, linears=linears, in_features=group.in_features), rows=None)

    def keep(self, assignment: Assignment, reports: list[LayerReport]) -> None:
        self.reports.extend(reports)

    def share(self, linear: nn.Linear, group_name: str, mine: PackedLinear | None, cfg: GPTQConfig) -> PackedLinear:
        """One linear's packed tensors, broadcast from its owner; shapes follow from the layer and its config."""
        if mine is None:
            mine = empty_packed(linear.out_features, linear.in_features, cfg)
        owner = self.owners[group_name]
        return PackedLinear(**{f: self.group.broadcast(getattr(mine, f), src=owner, stage="share")
                               for f in PACKED_FIELDS})

    def layer_reports(self) -> list[LayerReport]:
        return self.reports

    def _sum_on_owner(self, hessian_sum: torch.Tensor, n_tokens: int, owner: int) -> tuple[torch.Tensor, int] | None:
        """Every rank's partial sum gathered on the owner and added in rank order (deterministic), a row chunk
        at a time (workers/collectives.py), and the total token count; None elsewhere."""
        counts = torch.tensor([n_tokens], dtype=torch.int64, device=self.group.device)
        g = self.group
        if g.world == 1:
            return hessian_sum, n_tokens
        total = gather_sum(hessian_sum, owner, g.rank, g.world)  # in row chunks: bounded memory
        all_counts = g.gather(counts, dst=owner)
        if all_counts is None:
            return None
        g.count("reduce", (g.world - 1) * (nbytes(hessian_sum) + nbytes(counts)))
        return total, int(sum(int(c.item()) for c in all_counts))

    def _share_hessian(self, reduced: tuple[torch.Tensor, int] | None, owner: int,
                       template: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The owner's reduced Hessian sum and token count on every rank."""
        H, n = reduced if reduced is not None else (torch.empty_like(template), 0)
        count = self.group.broadcast(torch.tensor([n], dtype=torch.int64, device=self.group.device), src=owner,
                                     stage="reduce")
        return self.group.broadcast(H, src=owner, stage="reduce"), int(count.item())


class RowSplitStage:
    """Every rank solves rows `row_bounds(N, W)` of every linear against the same summed Hessian."""

    def __init__(self, group: RankGroup):
        self.group = group
        self.linears: list[str] = []  # every linear of the stage, in solve order
        self.slices: dict[str, LayerReport] = {}  # linear -> the report of this rank's slice of it

    def reduce(self, sums: dict[str, torch.Tensor], tokens: dict[str, int], aliases: dict[str, str]) -> Reduced:
        """Each group's rank-ordered sum on every rank, in place (the bits an owner gets), and the token count."""
        reduced: Reduced = {}
        for name, hessian_sum in sums.items():
            received = sum_to_all_(hessian_sum, self.group.rank, self.group.world)
            counts = self.group.sum_counts(torch.tensor([tokens[name]], dtype=torch.int64, device=self.group.device))
            self.group.count("reduce", received + (self.group.world - 1) * nbytes(counts))
            reduced[name] = (hessian_sum, int(counts.item()))
        return reduced

    def assign(self, block: nn.Module, group: InputGroup, linears: tuple[str, ...]) -> Assignment | None:
        """This rank's rows of each linear; linears whose slice here is empty are left out."""
        self.linears.extend(linears)
        rows = {}
        for lin in linears:
            bounds = row_bounds(block.get_submodule(lin).out_features, self.group.world)
            rows[lin] = (bounds[self.group.rank], bounds[self.group.rank + 1])
        mine = tuple(lin for lin in linears if rows[lin][0] < rows[lin][1])
        if not mine:
            return None
        return Assignment(InputGroup(name=group.name, linears=mine, in_features=group.in_features), rows=rows)

    def keep(self, assignment: Assignment, reports: list[LayerReport]) -> None:
        self.slices.update(zip(assignment.group.linears, reports, strict=True))

    def share(self, linear: nn.Linear, group_name: str, mine: PackedLinear | None, cfg: GPTQConfig) -> PackedLinear:
        """Every rank's packed row slice of one linear, broadcast in rank order and concatenated along the
        output dim: the layer as one rank would have packed all its rows. g_idx comes from the first slice."""
        bounds = row_bounds(linear.out_features, self.group.world)
        slices: list[PackedLinear] = []
        for r in range(self.group.world):
            n_rows = bounds[r + 1] - bounds[r]
            if n_rows == 0:
                continue
            src = mine if r == self.group.rank else empty_packed(n_rows, linear.in_features, cfg)
            fields = {f: self.group.broadcast(getattr(src, f), src=r, stage="share") for f in OUTPUT_DIM}
            g_idx = self.group.broadcast(src.g_idx, src=r, stage="share") if not slices else slices[0].g_idx
            slices.append(PackedLinear(g_idx=g_idx, **fields))
        return concat_packed(slices)

    def layer_reports(self) -> list[LayerReport]:
        """One report per linear, on rank 0 (none elsewhere), merged from every rank's slice reports."""
        every = self.group.all_gather_records(self.slices, stage="share")  # per rank: linear -> slice report
        if self.group.rank != 0:
            return []
        return [merge_slice_reports([slices[lin] for slices in every if lin in slices]) for lin in self.linears]


def merge_slice_reports(slices: list[LayerReport]) -> LayerReport:
    """One linear's report from its row slices' (in rank order): losses summed, the largest kernel error,
    the row-weighted mean error, `owner` -1; the rest is the same in every slice."""
    rows = [s.out_features for s in slices]
    return dataclasses.replace(
        slices[0], out_features=sum(rows), owner=-1,
        gptq_loss=sum(s.gptq_loss for s in slices), rtn_loss=sum(s.rtn_loss for s in slices),
        max_rel_err=max(s.max_rel_err for s in slices),
        mean_rel_err=sum(s.mean_rel_err * r for s, r in zip(slices, rows, strict=True)) / sum(rows),
    )


def empty_packed(out_features: int, in_features: int, cfg: GPTQConfig) -> PackedLinear:
    """A receive buffer for one linear's packed tensors."""
    shapes = packed_shapes(out_features, in_features, cfg.bits, cfg.group_size)
    return PackedLinear(**{f: torch.empty(shape, dtype=dtype) for f, (shape, dtype) in shapes.items()})

"""Collect for a stage of experts: every stage expert's Hessian sum from its tokens in a few batched products.

A stage of experts (one projection of some experts of one RoutedExperts, workers/moe.py) would take a
Hessian hook per expert and micro-batch: at 128 experts × 16 micro-batches that is thousands of small
launches and Python calls, and the GPU waits on the host. Instead the experts module hands each forward's
dispatch to `ExpertStageCollector`, which on PADDED_DEVICES

- pads a chunk of experts' routed rows into one [E_c, m, H] tensor (workers/expert_padding.py),
- for the down projections computes their inputs act(x Wgᵀ) · (x Wuᵀ) in two batched products,
- adds every expert's xᵀx into the stage's stacked [E_s, K, K] sums in one batched product (bf16 products
  are exact in fp32: tensor cores, fp32 accumulation over at most TENSOR_CORE_TOKENS tokens, IEEE adds);

experts that see every token (`all`, starved experts) share one x: the gate/up Hessian is computed once, the
down inputs by one GEMM over the chunk's concatenated weights. On the CPU each expert runs the ops a hook per
expert ran (bitwise); tests run the padded path on the CPU too.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from rayquant.solver.hessian import TENSOR_CORE_TOKENS, accumulate_hessian
from rayquant.workers.expert_padding import Dispatch, chunks, expert_linears, pad_routed, stacked_weights


class StageCollected(Exception):
    """Raised once a stage's experts have their rows: nothing after them in the block is needed."""


@dataclass
class ExpertStageCollector:
    """The stage's experts (indices into the RoutedExperts, in stage order) and their stacked sums."""

    module: nn.Module  # the RoutedExperts
    experts: list[int]
    role: str  # "gate_up": the experts' hidden rows; "down": the down projections' inputs
    sums: Tensor  # [E_s, K, K], Σxᵀx (mirrored only after the last micro-batch, on CUDA)
    validate_tokens: int
    padded: bool
    tokens: list[int] = field(init=False)
    samples: dict[int, Tensor] = field(default_factory=dict)  # stage position -> first rows of its input

    def __post_init__(self) -> None:
        self.tokens = [0] * len(self.experts)

    def collect(self, d: Dispatch) -> None:
        """Add this forward's rows of every stage expert; then end the forward (StageCollected)."""
        fed = [(p, e) for p, e in enumerate(self.experts) if d.rows(e)]
        if not self.padded:
            for p, e in fed:
                x = d.hidden if e in d.every_token else d.hidden[d.token_of[d.starts[e]:d.starts[e + 1]]]
                if self.role == "down":
                    gate, up, _ = expert_linears(self.module, e)
                    x = self.module.act_fn(gate(x)) * up(x)
                self._count(p, x, x.shape[0])
                accumulate_hessian(self.sums[p], x, mirror=False)
            raise StageCollected
        every = [(p, e) for p, e in fed if e in d.every_token]
        routed = sorted(((p, e) for p, e in fed if e not in d.every_token), key=lambda pe: pe[1])
        row_bytes = self._row_bytes(d)
        for chunk in chunks(every, d.hidden.shape[0], row_bytes):
            self._every_token_chunk(chunk, d)
        for chunk in chunks(routed, max((d.rows(e) for _, e in routed), default=0), row_bytes):
            x = pad_routed(d, [e for _, e in chunk]).x
            if self.role == "down":
                gate_w, up_w = stacked_weights(self.module, [e for _, e in chunk], (0, 1))
                x = self.module.act_fn(torch.bmm(x, gate_w.mT)) * torch.bmm(x, up_w.mT)
            self._add_chunk(chunk, x, [d.rows(e) for _, e in chunk])
        raise StageCollected

    def _row_bytes(self, d: Dispatch) -> int:
        """Bytes of one padded row: hidden, and for down the gate, up and product activations."""
        per = d.hidden.shape[1]
        if self.role == "down":
            per += 3 * expert_linears(self.module, self.experts[0])[0].out_features
        return per * d.hidden.element_size()

    def _every_token_chunk(self, chunk: list[tuple[int, int]], d: Dispatch) -> None:
        """Experts that see every token: one x for all of them (gate/up: one product for all)."""
        T = d.hidden.shape[0]
        if self.role == "gate_up":
            xtx = torch.zeros_like(self.sums[0])
            accumulate_hessian(xtx, d.hidden, mirror=False)
            for p, _ in chunk:
                self.sums[p] += xtx
                self._count(p, d.hidden, T)
            return
        E_c = len(chunk)
        gate_w, up_w = stacked_weights(self.module, [e for _, e in chunk], (0, 1))
        I = gate_w.shape[1]
        # one GEMM over the chunk's concatenated weights: [T, E_c·I] -> [E_c, T, I]
        gate = F.linear(d.hidden, gate_w.reshape(E_c * I, -1)).view(T, E_c, I).transpose(0, 1)
        up = F.linear(d.hidden, up_w.reshape(E_c * I, -1)).view(T, E_c, I).transpose(0, 1)
        self._add_chunk(chunk, (self.module.act_fn(gate) * up).contiguous(), [T] * E_c)

    def _add_chunk(self, chunk: list[tuple[int, int]], x: Tensor, rows: list[int]) -> None:
        """sums[p] += x[i]ᵀx[i] for the chunk's i-th expert at stage position p; x [E_c, m, K], zero past
        `rows[i]`. One batched product per run of consecutive positions."""
        for i, (p, _) in enumerate(chunk):
            self._count(p, x, rows[i], i)
        for i0, i1 in _runs([p for p, _ in chunk]):
            p0 = chunk[i0][0]
            sums = self.sums[p0:p0 + i1 - i0]
            for t in range(0, x.shape[1], TENSOR_CORE_TOKENS):
                part = x[i0:i1, t:t + TENSOR_CORE_TOKENS]
                if part.is_cuda and part.dtype in (torch.bfloat16, torch.float16) and sums.dtype == torch.float32:
                    torch.baddbmm(sums, part.mT, part, out_dtype=torch.float32, out=sums)
                else:
                    part = part.to(sums.dtype)
                    sums.baddbmm_(part.mT, part)

    def _count(self, p: int, x: Tensor, rows: int, i: int | None = None) -> None:
        """Tokens of stage position p, and its first rows (kernel validation) from the first forward that fed
        it: rows of x, or of x[i] (indexed only then: an index per expert and forward is host work)."""
        self.tokens[p] += rows
        if p not in self.samples and rows:
            self.samples[p] = (x if i is None else x[i])[:min(rows, self.validate_tokens)].clone()


def _runs(positions: list[int]) -> list[tuple[int, int]]:
    """Index ranges [i0, i1) of `positions` over which the positions rise by one (contiguous sums)."""
    runs: list[tuple[int, int]] = []
    for i, p in enumerate(positions):
        if runs and positions[i - 1] == p - 1:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs

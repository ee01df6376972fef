"""Experts' routed tokens as zero-padded batches: one batched product for many experts instead of one each.

An MoE forward dispatches (token, slot) pairs to E experts of one shape. Run one by one, each expert costs
a handful of small launches and Python calls (Qwen3-30B-A3B: 128 experts × 16 micro-batches per stage), and
the GPU waits on the host. Here the pairs, sorted by expert (`Dispatch`), are scattered into a zero-padded
[E_c, m, H] tensor by one index_put (m: the chunk's largest expert), so the experts' GEMMs become batched
products over stacked weights. Zero rows stay zero through bias-free linears and act(0) · 0, so padding
changes no real row and adds only exact zeros to Hessian sums. A batched product sums in another order than
a product per expert (fp rounding); the CPU keeps the per-expert ops (bitwise the unbatched path), and tests
run the padded path on the CPU against them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

# devices whose expert forwards and stage collects take padded batched products
PADDED_DEVICES = ("cuda",)
# bytes of padded rows (with the activations computed from them) one batched product takes at once: at
# DeepSeek-V3's 256 experts a micro-batch of 16 K tokens goes in ~10 chunks, not ~30 (a few launches and
# host-built index tensors each)
EXPERT_CHUNK_BYTES = 2 << 30


@dataclass(frozen=True)
class Dispatch:
    """One forward's (token, slot) pairs by expert, sorted stably by expert (RoutedExperts.forward)."""

    hidden: Tensor  # [T, H]
    token_of: Tensor  # [P] the token of each sorted pair
    expert_of: Tensor  # [P] the expert of each sorted pair (E: a dropped slot, sorted last)
    starts: list[int]  # [E + 1] each expert's first sorted pair (host)
    every_token: frozenset[int]  # experts that see every token (calibration mode, starved experts)

    def rows(self, e: int) -> int:
        return self.hidden.shape[0] if e in self.every_token else self.starts[e + 1] - self.starts[e]


@dataclass(frozen=True)
class PaddedRows:
    """The routed rows of a chunk of experts: x[i, :rows_i] are expert experts[i]'s tokens, the rest zero."""

    x: Tensor  # [E_c, m, H]
    slot: Tensor  # [b - a] the chunk position of each sorted pair in [a, b) (E_c: an expert not in the chunk)
    row: Tensor  # [b - a] its row in x
    pairs: slice  # [a, b): the sorted pairs of the experts from the chunk's first to its last


def pad_routed(d: Dispatch, experts: list[int]) -> PaddedRows:
    """`experts` (ascending) padded from the sorted pairs; experts between them not listed go to a dump slot."""
    lo, hi = experts[0], experts[-1]
    slots = {e: i for i, e in enumerate(experts)}
    a, b = d.starts[lo], d.starts[hi + 1]
    m = max(d.starts[e + 1] - d.starts[e] for e in experts)
    device = d.hidden.device
    pair_expert = d.expert_of[a:b] - lo
    slot = torch.tensor([slots.get(e, len(experts)) for e in range(lo, hi + 1)], device=device)[pair_expert]
    first = torch.tensor(d.starts[lo:hi + 1], device=device)[pair_expert]
    row = torch.arange(a, b, device=device) - first
    padded = d.hidden.new_zeros(len(experts) + 1, m, d.hidden.shape[1])
    padded[slot, row.clamp(max=m - 1)] = d.hidden[d.token_of[a:b]]  # dump rows: overwritten, never read
    return PaddedRows(padded[:len(experts)], slot, row, slice(a, b))


def chunks(experts: list, rows: int, row_bytes: int, expert_bytes: int = 0) -> list[list]:
    """`experts` cut into runs whose padded rows (`rows` each of `row_bytes`) and per-expert tensors
    (`expert_bytes`, e.g. stacked weights) stay within EXPERT_CHUNK_BYTES; one expert at least."""
    per_chunk = max(1, EXPERT_CHUNK_BYTES // max(1, rows * row_bytes + expert_bytes))
    return [experts[i:i + per_chunk] for i in range(0, len(experts), per_chunk)]


def expert_linears(module: nn.ModuleList, e: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    """Expert e's gate, up and down linears."""
    expert = module[e]
    return tuple(getattr(expert, name) for name in expert.names)


def stacked_weights(module: nn.ModuleList, experts: list[int], roles: tuple[int, ...] = (0, 1, 2)) -> list[Tensor]:
    """Each role's weights of `experts` stacked: gate and up [E_c, I, H], down [E_c, H, I]. Where the module
    keeps its experts' weights stacked already (`stack_expert_weights`), a run of consecutive experts is a
    view of them and other runs one gather; else one copy per call."""
    stacked = getattr(module, "stacked", None)
    if stacked is None:
        linears = [expert_linears(module, e) for e in experts]
        return [torch.stack([lin[r].weight for lin in linears]) for r in roles]
    if experts == list(range(experts[0], experts[0] + len(experts))):
        return [stacked[r][experts[0]:experts[0] + len(experts)] for r in roles]
    index = torch.tensor(experts, device=stacked[0].device)
    return [stacked[r].index_select(0, index) for r in roles]


def stack_expert_weights(module: nn.ModuleList, replaced: Callable[[nn.Linear, Tensor], None]) -> None:
    """Move each role's weights of every expert into one [E, ...] tensor (`module.stacked`), each expert's
    linear keeping a view of its row: `stacked_weights` then slices instead of copying every chunk's weights
    for every micro-batch of every pass (at DeepSeek-V3 over a TB per block). Installing a quantized expert
    writes into its row (packed_block.install writes in place). `replaced(linear, tensor it held)` is called
    as each linear moves, so the caller can let go of the old tensor before the next role is stacked."""
    module.stacked = []
    for r in range(3):
        linears = [expert_linears(module, e)[r] for e in range(len(module))]
        stacked = torch.stack([lin.weight for lin in linears])
        for e, lin in enumerate(linears):
            old = lin.weight.detach()
            lin.weight = nn.Parameter(stacked[e], requires_grad=False)
            replaced(lin, old)
        module.stacked.append(stacked)


def padded_forward(module: nn.ModuleList, d: Dispatch, pair_weights: Tensor, out: Tensor) -> None:
    """out[t] += Σ over token t's experts of weight · down(act(gate(x_t)) · up(x_t)), every expert routed its
    tokens only (no calibration flags), in chunks of experts with batched products. pair_weights [P]: each
    sorted pair's router weight."""
    E = len(module)
    fed = [e for e in range(E) if d.rows(e)]
    if not fed:
        return
    gate = expert_linears(module, fed[0])[0]
    H, I = gate.in_features, gate.out_features
    # stacked weights (GPU blocks) are sliced, not copied: a chunk's weights then cost no memory of their own
    weight_bytes = 0 if getattr(module, "stacked", None) is not None else 3 * I * H * gate.weight.element_size()
    for chunk in chunks(fed, max(d.rows(e) for e in fed), (2 * H + 3 * I) * d.hidden.element_size(), weight_bytes):
        padded = pad_routed(d, chunk)  # every pair in padded.pairs is a chunk expert's: unfed experts have none
        gate_w, up_w, down_w = stacked_weights(module, chunk)
        h = module.act_fn(torch.bmm(padded.x, gate_w.mT)) * torch.bmm(padded.x, up_w.mT)
        y = torch.bmm(h, down_w.mT)[padded.slot, padded.row]  # [b - a, H], the sorted pairs' outputs
        out.index_add_(0, d.token_of[padded.pairs], (y * pair_weights[padded.pairs, None]).to(out.dtype))

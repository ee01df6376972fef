"""The quantization grid: which columns form a group, each group's scale and zero point, codes.

The grid is the per-row min-max uniform grid used with GPTQ (Frantar et al., 2022, "GPTQ: Accurate
Post-Training Quantization for Generative Pre-trained Transformers"; one grid per group of columns
with grouping), as the reference implementation's `Quantizer.find_params` for weights builds it:

- the range always includes 0: xmin = min(W, 0), xmax = max(W, 0); an all-zero row gets [-1, 1];
- sym: the range is [-max|W|, max|W|] and zero = (maxq + 1) // 2 (the reference's zero point; the
  top level is clipped, as in the reference; unlike the reference, a row with no negative entry
  gets the symmetric range too instead of [0, xmax] around a mid-range zero, which clips half of it);
- asym: zero = round(-xmin / scale); where that is 0 (xmin > -scale / 2), zero = 1 and
  scale = xmax / (maxq - 1) instead, because GPTQ v1 checkpoints store zero - 1 and
  loaders cannot read zero point 0 back;
- scale = (xmax - xmin) / maxq, rounded to a float16-representable value the moment it is computed,
  so the float16 `scales` a checkpoint stores are exactly the ones the solver optimised against.

Act-order (`desc_act`, the reference implementation's heuristic) solves columns by descending
diag(H); `g_idx` maps every original column to its group. Dynamic groups are consecutive in solve
order, static groups are consecutive in original column order.
"""

from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.valid_settings import SUPPORTED_BITS  # noqa: F401  (the grid's widths; one home)

# Checkpoints store float16 scales: clamp below at the smallest positive float16 (a tinier scale
# would round to 0 and divide by zero) and refuse ranges whose scale overflows float16.
FLOAT16_MIN_SCALE = 2.0**-24
FLOAT16_MAX = 65504.0


class ScaleNotRepresentable(ValueError):
    """A group's weight range needs a scale beyond float16, which GPTQ checkpoints store."""


@dataclass(frozen=True)
class GroupGrid:
    scale: Tensor  # [..., N] compute dtype, float16-representable, > 0
    zero: Tensor   # [..., N] compute dtype, integer-valued in [0, maxq]


def max_level(bits: int) -> int:
    """Largest integer level `maxq` of a `bits`-bit grid."""
    return 2**bits - 1


def group_width(group_size: int, in_features: int) -> int:
    """Columns per group; group_size -1 means one group over all in_features."""
    return in_features if group_size == -1 else group_size


def count_groups(group_size: int, in_features: int) -> int:
    """G = ceil(K / group width); the last group may be partial."""
    return -(-in_features // group_width(group_size, in_features))


def find_grid(W_group: Tensor, bits: int, sym: bool) -> GroupGrid:
    """Min-max grid of each row of one group: W_group [..., N, columns] -> scale, zero [..., N].

    Raises:
        ScaleNotRepresentable: a row's range needs a scale above float16's maximum.
    """
    return grid_from_range(W_group.amin(dim=-1), W_group.amax(dim=-1), bits, sym)


def grid_from_range(wmin: Tensor, wmax: Tensor, bits: int, sym: bool) -> GroupGrid:
    """Min-max grids from each group-row's smallest and largest weight (any matching shapes).

    Raises:
        ScaleNotRepresentable: a range needs a scale above float16's maximum.
    """
    maxq = max_level(bits)
    xmin = torch.clamp(wmin, max=0.0)
    xmax = torch.clamp(wmax, min=0.0)
    if sym:
        xmax = torch.maximum(-xmin, xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = _float16_scale((xmax - xmin) / maxq, bits)
    if sym:
        return GroupGrid(scale=scale, zero=torch.full_like(scale, (maxq + 1) // 2))
    zero = torch.round(-xmin / scale)
    # GPTQ v1 qzeros store zero - 1, so zero point 0 cannot be written. A group that would get it
    # (xmin > -scale / 2) gets zero 1 and levels [-scale', (maxq-1)·scale'], scale' = xmax / (maxq-1):
    # scale' > scale, so they still span [xmin, xmax]
    below_one = zero < 1
    if bool(below_one.any()):
        scale = torch.where(below_one, _float16_scale(xmax / (maxq - 1), bits), scale)
        zero = torch.where(below_one, 1.0, zero)
    zero = torch.clamp(zero, max=maxq)
    return GroupGrid(scale=scale, zero=zero)


def raise_if_scale_overflows(scale: Tensor, bits: int) -> None:
    """Check raw scales against float16's maximum.

    Raises:
        ScaleNotRepresentable: a scale exceeds float16's maximum.
    """
    if bool((scale > FLOAT16_MAX).any()):
        raise ScaleNotRepresentable(
            f"a weight group needs scale {float(scale.max()):.6g} at {bits} bits, above float16's "
            f"{FLOAT16_MAX}; GPTQ checkpoints store float16 scales, so this layer cannot be quantized "
            "as is: check the model weights for corruption")


def _float16_scale(scale: Tensor, bits: int) -> Tensor:
    """scale rounded to float16 (what checkpoints store), clamped to float16's positive range.

    Raises:
        ScaleNotRepresentable: a scale exceeds float16's maximum.
    """
    raise_if_scale_overflows(scale, bits)
    return torch.clamp(scale, min=FLOAT16_MIN_SCALE).to(torch.float16).to(scale.dtype)


def find_group_grids(W: Tensor, g_idx: Tensor, n_groups: int, bits: int, sym: bool) -> GroupGrid:
    """Grids of all groups at once from W [..., N, K] and g_idx [K] or [..., K]: scale, zero [..., G, N].

    Leading dims are independent layers of one shape (the grid rules are row-wise, so a batch gives
    each layer bitwise its own grids). Consecutive groups (no act-order) reduce over a [..., N, G, width]
    view; any other g_idx by one scatter-reduce per bound. Either way no per-group gather (which synced
    the GPU G times).
    """
    K = W.shape[-1]
    width = -(-K // n_groups)
    index = g_idx.long().to(W.device)
    if bool((index == torch.arange(K, device=W.device) // width).all()):
        full = K // width * width  # the last group may be partial
        groups = W[..., :full].unflatten(-1, (-1, width))
        bounds = [(groups.amin(-1), groups.amax(-1))]
        if full < K:
            bounds.append((W[..., full:].amin(-1, keepdim=True), W[..., full:].amax(-1, keepdim=True)))
        wmin, wmax = (torch.cat(b, dim=-1) for b in zip(*bounds))
    else:
        index = index.unsqueeze(-2).expand_as(W)
        shape = (*W.shape[:-1], n_groups)
        wmin = W.new_full(shape, torch.inf).scatter_reduce(-1, index, W, "amin")
        wmax = W.new_full(shape, -torch.inf).scatter_reduce(-1, index, W, "amax")
    grid = grid_from_range(wmin, wmax, bits, sym)
    return GroupGrid(scale=grid.scale.transpose(-2, -1).contiguous(), zero=grid.zero.transpose(-2, -1).contiguous())


def quantize_to_grid(W: Tensor, scale: Tensor, zero: Tensor, maxq: int) -> Tensor:
    """Integer levels clamp(round(W / scale) + zero, 0, maxq), in W's dtype; shapes broadcast."""
    return torch.clamp(torch.round(W / scale) + zero, 0, maxq)


def act_order(H: Tensor) -> Tensor:
    """Solve order of act-order: columns by descending diag(H); stable, so ties keep column order."""
    return torch.argsort(torch.diagonal(H), descending=True, stable=True)


def group_aware_order(H: Tensor, width: int) -> Tensor:
    """Solve order of group-aware act-order (GAR): groups stay blocks of `width` consecutive channels,
    the columns of each group by descending diag(H), groups by their largest diag(H) (both stable).

    A partial last group stays last, so every group starts at a multiple of `width` in solve order.
    """
    diag = torch.diagonal(H)
    K = diag.numel()
    full = K // width * width
    local = torch.argsort(diag[:full].view(-1, width), dim=1, descending=True, stable=True)
    starts = torch.arange(0, full, width, device=diag.device)
    columns = local + starts[:, None]  # [G_full, width] original columns, each group in its own order
    order = torch.argsort(diag[columns[:, 0]], descending=True, stable=True)
    tail = full + torch.argsort(diag[full:], descending=True, stable=True)
    return torch.cat([columns[order].reshape(-1), tail])


def group_index(perm: Tensor, group_size: int, static_groups: bool) -> Tensor:
    """g_idx [K] int64: the group of every original column.

    Dynamic groups are consecutive in solve order (g_idx[perm[i]] = i // width); static groups are
    consecutive in original order (g_idx[c] = c // width) whatever the solve order.
    """
    K = perm.numel()
    width = group_width(group_size, K)
    positions = torch.arange(K, device=perm.device)
    if static_groups:
        return positions // width
    g_idx = torch.empty_like(positions)
    g_idx[perm] = positions // width
    return g_idx


def dequantize(codes: Tensor, scales: Tensor, zeros: Tensor, g_idx: Tensor) -> Tensor:
    """Weights [..., N, K] float32 = (codes - zeros[g_idx].T) * scales[g_idx].T.

    codes [..., N, K] integer levels, scales [..., G, N], zeros [..., G, N], g_idx [K] or [..., K];
    leading dims are independent layers of one shape.
    """
    return (codes.float() - per_column(zeros, g_idx).float()) * per_column(scales, g_idx).float()


def per_column(values: Tensor, g_idx: Tensor) -> Tensor:
    """Each input column's group value: values [..., G, N] at g_idx [K] or [..., K] -> [..., N, K]."""
    g = g_idx.long().to(values.device)
    index = g.unsqueeze(-1).expand(*values.shape[:-2], g.shape[-1], values.shape[-1])  # [..., K, N]
    return values.gather(-2, index).transpose(-2, -1)

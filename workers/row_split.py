"""Row-split solves: every rank solves a slice of each linear's output rows against the same Hessian.

GPTQ rows are independent given H (one Cholesky and one column order for all of them), so when a
true_sequential stage has fewer input groups than ranks, all ranks solve every group of the stage,
each on its own rows, instead of one owner solving while the others wait. Slices start at multiples
of ROW_ALIGN output rows: qzeros packs 32/bits zero points per int32 word along the output dim (and
32 values fill 3 words at 3 bits), so a slice's packed words never straddle its neighbour's and the
slices' packed tensors, concatenated along the output dim, are exactly the whole layer packed at once.
"""

from __future__ import annotations

ROW_ALIGN = 32  # output rows: a whole number of qzeros words at every supported bit width (2, 3, 4, 8)


def row_bounds(n_rows: int, world: int, align: int = ROW_ALIGN) -> list[int]:
    """Boundaries b_0 = 0 ≤ b_1 ≤ … ≤ b_W = n_rows: rank r solves rows [b_r, b_{r+1}).

    Inner boundaries are multiples of `align`, the slices as equal as whole units of `align` rows
    allow (a rank may get none); rows past the last whole unit go to the last rank."""
    units = n_rows // align
    return [align * (r * units // world) for r in range(world)] + [n_rows]

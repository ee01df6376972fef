"""Validation of a packed layer: the dequant-GEMM on the packed tensors against the solver's weights.

Run on held-out activations after packing; it catches a packing bug, a corrupted tensor, or a
kernel that disagrees with `dequant_gemm_reference`, before the layer is written to a checkpoint.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.kernels.dequant_gemm import dequant_gemm_reference
from rayquant.solver.pack import PackedLinear, concat_packed


class EmptyValidationInput(ValueError):
    """There are no activation rows to validate a packed layer on."""


class KernelMismatch(Exception):
    """The dequant-GEMM of the packed layer disagrees with the solver's dequantized weights."""


@dataclass(frozen=True)
class LayerValidation:
    max_rel_err: float   # max over tokens of ||y_kernel - y_expected|| / ||y_expected||
    mean_rel_err: float  # mean of the same over tokens


# Elements of the largest temporary of one batched gemm call: y [ΣM, ΣN], the dequantized weights [ΣN, K],
# the float64 activations [ΣM, K]. Layers cut into chunks under it (a single layer may exceed it alone);
# at 64 M DeepSeek-V3's 256 expert down projections took 64 calls.
VALIDATION_CHUNK_ELEMENTS = 256 << 20
# Devices where layers share gemm calls (y's off-diagonal blocks computed and dropped): on CUDA a call's
# launches and syncs cost more than those products on the tensor cores. The CPU has no launches to save,
# and wider operands fall out of its caches (even an expert's gate/up pair in one call validated 256 expert
# linears 1.5x slower, on different x's 3x), so there every layer takes its own call, as one by one.
BATCHED_DEVICES = ("cuda",)


def validate_packed_layer(x: Tensor, packed: PackedLinear, bits: int, expected_weight: Tensor, tolerance: float,
                          gemm: Callable[[Tensor, PackedLinear, int], Tensor] = dequant_gemm_reference,
                          ) -> LayerValidation:
    """Compare gemm(x, packed) with x @ expected_weight.T per token; x [M, K], expected_weight [N, K].

    `gemm` is the kernel under test (default: the pure-torch reference).

    Raises:
        KernelMismatch: the max relative error over tokens exceeds tolerance, or is not finite.
        EmptyValidationInput: x has no rows.
    """
    return validate_packed_layers([x], [packed], bits, [expected_weight], tolerance, gemm)[0]


def validate_packed_layers(xs: list[Tensor], packed: list[PackedLinear], bits: int, expected: list[Tensor],
                           tolerance: float, gemm: Callable[[Tensor, PackedLinear, int], Tensor] = dequant_gemm_reference,
                           names: list[str] | None = None) -> list[LayerValidation]:
    """validate_packed_layer of every (xs[i] [M_i, K], packed[i], expected[i] [N_i, K]), with few gemm calls.

    Layers of one in_features, packing and x dtype whose g_idx are equal form one wider layer: packed
    tensors concatenated along the output dim, activations along the tokens (an x shared by several
    layers, as an input group's, once); one gemm gives y [ΣM, ΣN] and each layer reads its block (its
    x's rows, its own columns). Chunks stay under VALIDATION_CHUNK_ELEMENTS. Act-order layers (each its
    own g_idx) run one by one, as every layer off BATCHED_DEVICES (the CPU). The expected x @ expected.T
    is computed in float64, batched where shapes agree.

    Raises:
        KernelMismatch: a layer's max relative error over tokens exceeds tolerance, or is not finite
            (the first such layer in order, named by names[i], or by its index among several).
        EmptyValidationInput: a layer's x has no rows.
    """
    if not (len(xs) == len(packed) == len(expected) and (names is None or len(names) == len(xs))):
        raise ValueError(f"{len(xs)} activations, {len(packed)} packed layers, {len(expected)} expected weights"
                         f"{'' if names is None else f' and {len(names)} names'}: pass one of each per layer")

    def label(i: int) -> str:  # what a message names a layer by; nothing for a lone unnamed layer
        return f"{names[i]}: " if names is not None else f"layer {i}: " if len(xs) > 1 else ""

    for i, x in enumerate(xs):
        if x.dim() != 2 or x.shape[0] == 0:
            raise EmptyValidationInput(
                f"{label(i)}validation activations have shape {tuple(x.shape)}; a packed layer is validated on "
                "x [M, K] with M > 0: raise calibration.eval_samples")
    checks: list[LayerValidation | None] = [None] * len(xs)
    for chunk in _chunks(xs, packed, bits, expected):
        for i, check in zip(chunk, _check_chunk(chunk, xs, packed, bits, expected, gemm)):
            checks[i] = check
    for i, check in enumerate(checks):
        if not check.max_rel_err <= tolerance:  # also catches NaN
            raise KernelMismatch(
                f"{label(i)}packed layer output differs from the solver's dequantized weights: max relative error "
                f"{check.max_rel_err:.3g} > tolerance {tolerance:.3g} (mean {check.mean_rel_err:.3g}; "
                f"{xs[i].shape[0]} tokens, in_features={xs[i].shape[-1]}, out_features={expected[i].shape[0]}, "
                f"bits={bits}); the packed qweight/qzeros/scales/g_idx do not encode the solved weights or "
                "the kernel is wrong; raise the validation tolerance only if the kernel's float16 rounding "
                "alone exceeds it")
    return checks


def _chunks(xs: list[Tensor], packed: list[PackedLinear], bits: int, expected: list[Tensor]) -> list[list[int]]:
    """Layer indices that one gemm call validates together: one in_features, packing, x dtype and g_idx,
    on BATCHED_DEVICES."""
    buckets: dict[tuple, list[int]] = {}
    for i, (x, p) in enumerate(zip(xs, packed)):
        K, N = p.g_idx.numel(), p.scales.shape[-1]
        # whole qzeros words per layer (N·bits % 32 == 0, as packing demands): the concatenated words are
        # then exactly the concatenated layers packed at once; anything else runs alone (the gemm says why)
        whole = p.qzeros.shape[-1] * 32 == N * bits and p.qweight.shape[0] * 32 == K * bits
        key = ((K, p.scales.shape[0], x.dtype, x.device, p.qweight.device,
                tuple(t.dtype for t in (p.qweight, p.qzeros, p.scales, p.g_idx)))
               if whole and x.device.type in BATCHED_DEVICES else ("alone", i))
        buckets.setdefault(key, []).append(i)
    chunks = []
    for layers in buckets.values():
        classes = {0: layers}
        if len(layers) > 1:  # act-order layers each have their own g_idx: classes of equal g_idx
            g_idx = torch.stack([packed[i].g_idx for i in layers])
            # usually all equal (no act-order): one comparison; unique by rows sorts them (40 ms at 40 × 7168)
            if not bool((g_idx == g_idx[0]).all()):
                same = torch.unique(g_idx, dim=0, return_inverse=True)[1]
                classes = {}
                for i, c in zip(layers, same.tolist()):
                    classes.setdefault(c, []).append(i)
        for members in classes.values():
            chunk, rows, cols, seen = [], 0, 0, set()
            for i in members:
                M = 0 if id(xs[i]) in seen else xs[i].shape[0]
                N, K = expected[i].shape[0], xs[i].shape[-1]
                if chunk and max((rows + M) * (cols + N), (cols + N) * K, (rows + M) * K) > VALIDATION_CHUNK_ELEMENTS:
                    chunks.append(chunk)
                    chunk, rows, cols, seen, M = [], 0, 0, set(), xs[i].shape[0]
                chunk.append(i)
                rows, cols = rows + M, cols + N
                seen.add(id(xs[i]))
            chunks.append(chunk)
    return chunks


def _check_chunk(chunk: list[int], xs: list[Tensor], packed: list[PackedLinear], bits: int, expected: list[Tensor],
                 gemm: Callable[[Tensor, PackedLinear, int], Tensor]) -> list[LayerValidation]:
    """The errors of the chunk's layers from one gemm call on their concatenation."""
    if len(chunk) == 1:
        outputs = [gemm(xs[chunk[0]], packed[chunk[0]], bits)]
    else:
        first_row: dict[int, int] = {}  # where each distinct x starts in the stacked activations
        distinct = []
        for i in chunk:
            if id(xs[i]) not in first_row:
                first_row[id(xs[i])] = sum(x.shape[0] for x in distinct)
                distinct.append(xs[i])
        X = distinct[0] if len(distinct) == 1 else torch.cat(distinct)  # [ΣM, K]
        y = gemm(X, concat_packed([packed[i] for i in chunk]), bits)  # [ΣM, ΣN]
        col, outputs = 0, []
        for i in chunk:
            r, N = first_row[id(xs[i])], packed[i].scales.shape[-1]
            outputs.append(y[r:r + xs[i].shape[0], col:col + N])
            col += N
    # float64 per-token errors, one bmm per shape of the chunk's layers
    by_shape: dict[tuple[int, int], list[int]] = {}
    for j, i in enumerate(chunk):
        by_shape.setdefault((xs[i].shape[0], expected[i].shape[0]), []).append(j)
    max_err, mean_err = [0.0] * len(chunk), [0.0] * len(chunk)
    for members in by_shape.values():
        y = _stack([outputs[j] for j in members]).double()  # [c, M, N]
        X = _stack([xs[chunk[j]] for j in members]).double()  # [c, M, K]
        W = _stack([expected[chunk[j]] for j in members]).double()  # [c, N, K]
        y_expected = X @ W.transpose(1, 2)
        # per-token error relative to that token's output norm; an all-zero token compares absolutely
        denom = torch.linalg.vector_norm(y_expected, dim=-1).clamp_min(torch.finfo(torch.float64).tiny)
        rel = torch.linalg.vector_norm(y - y_expected, dim=-1) / denom  # [c, M]
        for j, worst, mean in zip(members, rel.amax(-1).tolist(), rel.mean(-1).tolist()):
            max_err[j], mean_err[j] = worst, mean
    return [LayerValidation(max_rel_err=m, mean_rel_err=a) for m, a in zip(max_err, mean_err)]


def _stack(tensors: list[Tensor]) -> Tensor:
    """torch.stack, without a copy for one tensor."""
    return tensors[0].unsqueeze(0) if len(tensors) == 1 else torch.stack(tensors)

"""GPTQ v1 checkpoint tensors (checkpoint_format "gptq", the layout of the reference GPTQ / AutoGPTQ
`QuantLinear.pack`, which transformers, GPTQModel and vLLM load):

- qweight int32 [K·b/32, N]: codes packed along K; value j of a word sits at bits [b·j, b·j+b);
- qzeros  int32 [G, N·b/32]: zero points packed the same way along N, stored as zero - 1 (v1);
- scales  float16 [G, N];  g_idx int32 [K].

All widths are one rule: the values of a column form a little-endian bit stream, value i at bits
[b·i, b·i+b) of the concatenated 32-bit words. For b = 2, 4, 8 no value crosses a word; for b = 3
every 32 values fill 3 words and values 10 and 21 straddle word boundaries (the standard 3-bit
layout), so a packed dimension needs (b · size) % 32 == 0: K % 32 == 0 and N % 32 == 0 at 3 bits.
"""

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.gptq import GPTQResult
from rayquant.solver.grid import count_groups, dequantize, max_level
from rayquant.solver.valid_settings import SUPPORTED_BITS

WORD_BITS = 32
_WORD_MASK = (1 << WORD_BITS) - 1
PACK_CHUNK_ELEMENTS = 1 << 25  # values per int64 pass of _pack_dim0 (256 MB a temporary)


class UnpackableShape(ValueError):
    """A dimension cannot be packed into whole int32 words at this bit width."""


class CodesOutOfRange(ValueError):
    """Codes or zero points do not fit in the bit width."""


class ZeroPointNotRepresentable(ValueError):
    """GPTQ v1 stores zero - 1, so zero point 0 cannot be written (loaders would read 2**bits)."""


@dataclass(frozen=True)
class PackedLinear:
    qweight: Tensor  # int32 [K*bits/32, N]
    qzeros: Tensor   # int32 [G, N*bits/32]  stores zero-1 (v1)
    scales: Tensor   # float16 [G, N]
    g_idx: Tensor    # int32 [K]


@dataclass(frozen=True)
class UnpackedLinear:
    codes: Tensor    # uint8 [N, K]
    zeros: Tensor    # int32 [G, N]
    scales: Tensor   # float32 [G, N] (the float16 values)
    g_idx: Tensor    # int32 [K]


PACKED_FIELDS = tuple(field.name for field in dataclasses.fields(PackedLinear))  # the checkpoint's names, in order


# the dim along which each packed tensor holds the output rows (g_idx is per input channel: no such dim)
OUTPUT_DIM = {"qweight": 1, "qzeros": 1, "scales": 1}


def concat_packed(layers: list[PackedLinear]) -> PackedLinear:
    """One packed layer whose output rows are the layers' in order: row slices of one solve, or layers of one
    in_features and g_idx (g_idx comes from the first). Exact wherever each layer's output rows fill whole
    qzeros words, which packing demands (N · bits a multiple of 32)."""
    fields = {f: torch.cat([getattr(p, f) for p in layers], dim=d) for f, d in OUTPUT_DIM.items()}
    return PackedLinear(g_idx=layers[0].g_idx, **fields)


def packed_shapes(out_features: int, in_features: int, bits: int, group_size: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of each packed tensor of an [N, K] linear, known before it is solved."""
    n_groups = count_groups(group_size, in_features)
    return {
        "qweight": ((in_features * bits // WORD_BITS, out_features), torch.int32),
        "qzeros": ((n_groups, out_features * bits // WORD_BITS), torch.int32),
        "scales": ((n_groups, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }


def pack_linear(result: GPTQResult, bits: int) -> PackedLinear:
    """The four GPTQ v1 checkpoint tensors of one solved linear.

    Raises:
        UnpackableShape: (bits · K) or (bits · N) is not a multiple of 32.
        ZeroPointNotRepresentable: an asymmetric grid chose zero point 0.
    """
    _check_ranges(result.codes, result.zeros, bits)
    return PackedLinear(
        qweight=_pack_dim0(result.codes.T, bits, "in_features (K)"),
        qzeros=_pack_dim0(result.zeros.T.to(torch.int64) - 1, bits, "out_features (N)").T.contiguous(),
        scales=result.scales.to(torch.float16),
        g_idx=result.g_idx.to(torch.int32),
    )


def pack_linears(results: list[GPTQResult], bits: int) -> list[PackedLinear]:
    """pack_linear of every result, in few calls: layers of one in_features, group count, device and dtypes
    are packed as one layer of their output rows concatenated, then split (qweight packs each output
    column on its own, qzeros whole words per layer: N · bits % 32 == 0), so bitwise pack_linear's tensors
    with one range check for all (an MoE stage packs hundreds of linears). A layer that cannot be packed
    raises as pack_linear does, the first such in order."""
    out: list[PackedLinear | None] = [None] * len(results)
    buckets: dict[tuple, list[int]] = {}
    for i, r in enumerate(results):
        key = (r.codes.shape[1], r.scales.shape[0], r.codes.device, r.codes.dtype, r.zeros.dtype, r.scales.dtype)
        whole = (r.codes.shape[0] * bits) % WORD_BITS == 0 and r.codes.numel() and r.zeros.numel()
        buckets.setdefault(key if whole and len(results) > 1 else ("alone", i), []).append(i)
    for layers in buckets.values():
        if len(layers) == 1:
            out[layers[0]] = pack_linear(results[layers[0]], bits)
            continue
        parts = [results[i] for i in layers]
        try:
            joined = pack_linear(dataclasses.replace(
                parts[0], codes=torch.cat([r.codes for r in parts]), zeros=torch.cat([r.zeros for r in parts], dim=1),
                scales=torch.cat([r.scales for r in parts], dim=1)), bits)
        except (UnpackableShape, CodesOutOfRange, ZeroPointNotRepresentable):
            for i in layers:  # the first layer at fault raises, as pack_linear alone would
                out[i] = pack_linear(results[i], bits)
            raise
        widths = [r.codes.shape[0] for r in parts]
        split = {f: getattr(joined, f).split([n * bits // WORD_BITS if f == "qzeros" else n for n in widths],
                                             dim=d) for f, d in OUTPUT_DIM.items()}
        for j, i in enumerate(layers):
            out[i] = PackedLinear(g_idx=results[i].g_idx.to(torch.int32),
                                  **{f: split[f][j].contiguous() for f in OUTPUT_DIM})
    return out


def _check_ranges(codes: Tensor, zeros: Tensor, bits: int) -> None:
    """pack_qweight's and pack_qzeros' value checks with one host sync (an MoE stage packs hundreds of
    linears; five syncs each stalled the GPU between them)."""
    if bits not in SUPPORTED_BITS:
        raise UnpackableShape(f"bits={bits} is not one of {SUPPORTED_BITS}; set quant.bits to one of them")
    if not codes.numel() or not zeros.numel():
        _check_values(codes, bits, "codes")
        _check_values(zeros, bits, "zero points")
        return
    stats = torch.stack([codes.min().long(), codes.max().long(), zeros.min().long(), zeros.max().long(),
                         (zeros == 0).sum()]).tolist()
    if stats[0] < 0 or stats[1] > max_level(bits):
        _check_values(codes, bits, "codes")  # raises, naming the range
    if stats[2] < 0 or stats[3] > max_level(bits):
        _check_values(zeros, bits, "zero points")
    if stats[4]:
        pack_qzeros(zeros, bits)  # raises ZeroPointNotRepresentable


def unpack_linear(packed: PackedLinear, bits: int) -> UnpackedLinear:
    """Codes, zero points, scales and g_idx exactly as pack_linear received them."""
    in_features = packed.g_idx.numel()
    out_features = packed.scales.shape[1]
    return UnpackedLinear(
        codes=unpack_qweight(packed.qweight, bits, in_features),
        zeros=unpack_qzeros(packed.qzeros, bits, out_features),
        scales=packed.scales.float(),
        g_idx=packed.g_idx.to(torch.int32),
    )


def packed_bits(packed: PackedLinear) -> int:
    """A packed layer's bit width from its own shapes: qweight holds K·bits/32 words per output column."""
    return packed.qweight.shape[0] * 32 // packed.g_idx.numel()


def dequantize_packed(packed: PackedLinear, bits: int) -> Tensor:
    """W [N, K] float32 exactly as a checkpoint reader rebuilds it from the packed tensors."""
    u = unpack_linear(packed, bits)
    return dequantize(u.codes, u.scales, u.zeros, u.g_idx)


def pack_qweight(codes: Tensor, bits: int) -> Tensor:
    """codes [N, K] -> qweight int32 [K*bits/32, N], packed along K.

    Raises:
        UnpackableShape: (bits · K) is not a multiple of 32.
        CodesOutOfRange: a code is outside [0, 2**bits - 1].
    """
    _check_values(codes, bits, "codes")
    return _pack_dim0(codes.T, bits, "in_features (K)")


def unpack_qweight(qweight: Tensor, bits: int, in_features: int) -> Tensor:
    """qweight int32 [K*bits/32, N] -> codes uint8 [N, K]."""
    return _unpack_dim0(qweight, bits, in_features, "in_features (K)").T.to(torch.uint8)


def pack_qzeros(zeros: Tensor, bits: int) -> Tensor:
    """zeros [G, N] -> qzeros int32 [G, N*bits/32], packed along N, storing zero - 1 (v1).

    Raises:
        UnpackableShape: (bits · N) is not a multiple of 32.
        CodesOutOfRange: a zero point is outside [0, 2**bits - 1].
        ZeroPointNotRepresentable: a zero point is 0.
    """
    _check_values(zeros, bits, "zero points")
    n_zero = int((zeros == 0).sum())
    if n_zero:
        raise ZeroPointNotRepresentable(
            f"{n_zero} of {zeros.numel()} group zero points are 0; GPTQ v1 qzeros store zero - 1 and "
            f"loaders read 0 back as {2**bits}, so these groups cannot be written: use quant.sym=true")
    return _pack_dim0(zeros.T.to(torch.int64) - 1, bits, "out_features (N)").T.contiguous()


def unpack_qzeros(qzeros: Tensor, bits: int, out_features: int) -> Tensor:
    """qzeros int32 [G, N*bits/32] -> zeros int32 [G, N] (stored value + 1, modulo 2**bits)."""
    stored = _unpack_dim0(qzeros.T, bits, out_features, "out_features (N)").T
    return ((stored + 1) & max_level(bits)).to(torch.int32).contiguous()


def _check_values(values: Tensor, bits: int, what: str) -> None:
    if bits not in SUPPORTED_BITS:
        raise UnpackableShape(f"bits={bits} is not one of {SUPPORTED_BITS}; set quant.bits to one of them")
    if values.numel() and (int(values.min()) < 0 or int(values.max()) > max_level(bits)):
        raise CodesOutOfRange(
            f"{what} span [{int(values.min())}, {int(values.max())}], outside [0, {max_level(bits)}] "
            f"of a {bits}-bit grid: pack them with the bits they were solved with")


def _bit_positions(size: int, bits: int, what: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """Word index and bit offset of each of `size` values in the stream."""
    if bits not in SUPPORTED_BITS:
        raise UnpackableShape(f"bits={bits} is not one of {SUPPORTED_BITS}; set quant.bits to one of them")
    if (bits * size) % WORD_BITS:
        multiple = WORD_BITS // math.gcd(bits, WORD_BITS)
        raise UnpackableShape(
            f"{what}={size} cannot be packed at {bits} bits: GPTQ packs {bits}-bit values into whole "
            f"int32 words, which needs a multiple of {multiple}; quantize this layer with other bits "
            "or leave it unquantized")
    start = torch.arange(size, device=device, dtype=torch.int64) * bits
    return start // WORD_BITS, start % WORD_BITS


def _pack_dim0(values: Tensor, bits: int, what: str) -> Tensor:
    """values (any integer dtype) [L, C] in [0, 2**bits) -> int32 words [L*bits/32, C].

    Columns pack independently, so they go in chunks of at most PACK_CHUNK_ELEMENTS values: the int64
    temporaries stay bounded (a 405B block's gate and up packed together are 1.7 G codes, 14 GB per int64
    copy) and the words are bitwise those of one pass."""
    L, C = values.shape
    word, offset = _bit_positions(L, bits, what, values.device)
    straddles = offset + bits > WORD_BITS  # only at 3 bits: the high bits go to the next word
    out = torch.empty(L * bits // WORD_BITS, C, dtype=torch.int32, device=values.device)
    step = max(1, PACK_CHUNK_ELEMENTS // max(L, 1))
    for c in range(0, C, step):
        chunk = values[:, c:c + step].to(torch.int64)
        words = torch.zeros(out.shape[0], chunk.shape[1], dtype=torch.int64, device=values.device)
        words.index_add_(0, word, (chunk << offset[:, None]) & _WORD_MASK)
        words.index_add_(0, word[straddles] + 1, chunk[straddles] >> (WORD_BITS - offset[straddles])[:, None])
        # reinterpret the unsigned 32-bit words as int32 (two's complement)
        out[:, c:c + step] = torch.where(words >= 1 << 31, words - (1 << WORD_BITS), words)
    return out


def _unpack_dim0(packed: Tensor, bits: int, size: int, what: str) -> Tensor:
    """int32 words [size*bits/32, C] -> values int64 [size, C]."""
    word, offset = _bit_positions(size, bits, what, packed.device)
    if packed.shape[0] != size * bits // WORD_BITS:
        raise UnpackableShape(
            f"{packed.shape[0]} packed words cannot hold {what}={size} values at {bits} bits "
            f"(expected {size * bits // WORD_BITS}): the tensor was packed with other bits or shape")
    words = packed.to(torch.int64) & _WORD_MASK
    values = words[word] >> offset[:, None]
    straddles = offset + bits > WORD_BITS
    values[straddles] |= words[word[straddles] + 1] << (WORD_BITS - offset[straddles])[:, None]
    return values & max_level(bits)

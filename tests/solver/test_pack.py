"""GPTQ v1 packing: exact round trips, hand-computed words, the standard 3-bit layout, errors."""

import pytest
import torch

import rayquant.solver.pack as pack_module
from rayquant.solver.gptq import GPTQConfig, GPTQResult, solve_gptq
from rayquant.solver.pack import (PACKED_FIELDS, CodesOutOfRange, UnpackableShape, ZeroPointNotRepresentable,
                                  pack_linear, pack_linears, pack_qweight, pack_qzeros, unpack_linear, unpack_qweight, unpack_qzeros)
from tests.solver.calibration_cases import layer_case


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_random_codes_and_zeros_round_trip_exactly(bits: int) -> None:
    gen = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 2**bits, (96, 256), generator=gen).to(torch.uint8)  # [N, K]
    codes[0, :] = 2**bits - 1  # top level in every bit position
    qweight = pack_qweight(codes, bits)
    assert qweight.dtype == torch.int32 and qweight.shape == (256 * bits // 32, 96)
    assert torch.equal(unpack_qweight(qweight, bits, 256), codes)
    zeros = torch.randint(1, 2**bits, (8, 96), generator=gen).to(torch.int32)  # [G, N]
    qzeros = pack_qzeros(zeros, bits)
    assert qzeros.dtype == torch.int32 and qzeros.shape == (8, 96 * bits // 32)
    assert torch.equal(unpack_qzeros(qzeros, bits, 96), zeros)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_packing_in_column_chunks_gives_the_words_of_one_pass(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Large layers pack a bounded number of columns at a time (a 405B block's gate and up); the words must
    not depend on where the chunks fall, including a last chunk narrower than the others."""
    gen = torch.Generator().manual_seed(10 + bits)
    codes = torch.randint(0, 2**bits, (100, 256), generator=gen).to(torch.uint8)  # [N, K]: qweight's C = 100
    whole = pack_qweight(codes, bits)
    monkeypatch.setattr(pack_module, "PACK_CHUNK_ELEMENTS", 256 * 7)  # 7 columns a chunk: 15 chunks, the last 2 wide
    chunked = pack_qweight(codes, bits)
    assert torch.equal(chunked, whole)
    assert torch.equal(unpack_qweight(chunked, bits, 256), codes)


def test_4bit_qweight_words_by_hand() -> None:
    codes = torch.tensor([            # [N=4, K=8]; word of output n = Σ_j codes[n, j] << 4j
        [1, 2, 3, 4, 5, 6, 7, 8],     # 0x87654321 = 2271560481 -> int32 2271560481 - 2**32
        [15, 0, 0, 0, 0, 0, 0, 0],    # 0x0000000F
        [0, 0, 0, 0, 0, 0, 0, 15],    # 0xF0000000 = 4026531840 -> -268435456
        [10, 11, 12, 13, 14, 15, 0, 9],  # 0x90FEDCBA = 2432621754 -> -1862345542
    ], dtype=torch.uint8)
    expected = torch.tensor([[-2023406815, 15, -268435456, -1862345542]], dtype=torch.int32)
    assert torch.equal(pack_qweight(codes, 4), expected)
    assert torch.equal(unpack_qweight(expected, 4, 8), codes)


def test_4bit_qzeros_store_zero_minus_one_by_hand() -> None:
    zeros = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8], [8] * 8], dtype=torch.int32)  # [G=2, N=8]
    expected = torch.tensor([[0x76543210], [0x77777777]], dtype=torch.int32)   # 1985229328, 2004318071
    assert torch.equal(pack_qzeros(zeros, 4), expected)
    assert torch.equal(unpack_qzeros(expected, 4, 8), zeros)


def test_3bit_values_straddle_words_in_the_standard_layout_by_hand() -> None:
    # one column per case; 32 values x 3 bits = 3 words, value i at bits [3i, 3i+3) of the 96
    cases = [
        ({i: 7 for i in range(32)}, [-1, -1, -1]),       # all 96 bits set
        ({10: 4}, [0, 1, 0]),                             # value 10: bits 30, 31 | 32 -> high bit in word 1
        ({10: 3}, [-1073741824, 0, 0]),                   # low bits 30, 31 of word 0: 0xC0000000
        ({11: 5}, [0, 0b1010, 0]),                        # bits 33..35 = word 1 bits 1..3
        ({21: 1}, [0, -2147483648, 0]),                   # value 21: bit 63 = word 1 bit 31
        ({21: 6}, [0, 0, 3]),                             # bits 64, 65 = word 2 bits 0, 1
        ({31: 7}, [0, 0, -536870912]),                    # bits 93..95 = word 2 bits 29..31
    ]
    codes = torch.zeros(len(cases), 32, dtype=torch.uint8)
    for n, (values, _) in enumerate(cases):
        for i, v in values.items():
            codes[n, i] = v
    expected = torch.tensor([words for _, words in cases], dtype=torch.int32).T  # [3, N]
    assert torch.equal(pack_qweight(codes, 3), expected)
    assert torch.equal(unpack_qweight(expected, 3, 32), codes)


def _reference_pack_3bit(codes: torch.Tensor) -> torch.Tensor:
    """The standard 3-bit layout written out word by word on Python ints (values 10 and 21 straddle words)."""
    intweight = codes.T.tolist()  # [K][N]
    K, N = len(intweight), len(intweight[0])
    qweight = [[0] * N for _ in range(K // 32 * 3)]
    i = row = 0
    while row < len(qweight):
        for n in range(N):
            col = [intweight[k][n] for k in range(K)]
            w0 = sum(col[j] << (3 * (j - i)) for j in range(i, i + 10)) | ((col[i + 10] << 30) & 0xFFFFFFFF)
            w1 = ((col[i + 10] >> 2) & 1) | sum(col[j] << (3 * (j - i - 11) + 1) for j in range(i + 11, i + 21))
            w1 |= (col[i + 21] << 31) & 0xFFFFFFFF
            w2 = ((col[i + 21] >> 1) & 0x3) | sum(col[j] << (3 * (j - i - 22) + 2) for j in range(i + 22, i + 32))
            for r, w in enumerate((w0, w1, w2)):
                qweight[row + r][n] = w - (1 << 32) if w >= 1 << 31 else w
        i += 32
        row += 3
    return torch.tensor(qweight, dtype=torch.int32)


def test_3bit_matches_the_reference_packing_loop() -> None:
    codes = torch.randint(0, 8, (5, 96), generator=torch.Generator().manual_seed(3)).to(torch.uint8)
    assert torch.equal(pack_qweight(codes, 3), _reference_pack_3bit(codes))


@pytest.mark.parametrize("bits,sym", [(4, True), (3, False), (8, True), (2, False)])
def test_pack_linear_round_trips_a_solved_layer(bits: int, sym: bool) -> None:
    case = layer_case(out_features=64, seed=bits)
    result = solve_gptq(case.weight, case.hessian_sum, case.n_tokens,
                        GPTQConfig(bits=bits, group_size=64, desc_act=True, sym=sym))
    packed = pack_linear(result, bits)
    assert packed.scales.dtype == torch.float16 and packed.g_idx.dtype == torch.int32
    assert packed.qweight.shape == (256 * bits // 32, 64) and packed.qzeros.shape == (4, 64 * bits // 32)
    unpacked = unpack_linear(packed, bits)
    assert torch.equal(unpacked.codes, result.codes)
    assert torch.equal(unpacked.zeros, result.zeros)
    assert torch.equal(unpacked.scales, result.scales)
    assert torch.equal(unpacked.g_idx, result.g_idx)


def test_unpackable_shapes_name_the_needed_multiple() -> None:
    with pytest.raises(UnpackableShape, match="in_features \\(K\\)=48.*multiple of 32"):
        pack_qweight(torch.zeros(4, 48, dtype=torch.uint8), 3)
    with pytest.raises(UnpackableShape, match="out_features \\(N\\)=16.*multiple of 32"):
        pack_qzeros(torch.ones(1, 16, dtype=torch.int32), 3)
    with pytest.raises(UnpackableShape, match="multiple of 8"):
        pack_qweight(torch.zeros(4, 12, dtype=torch.uint8), 4)
    with pytest.raises(UnpackableShape, match="bits=5"):
        pack_qweight(torch.zeros(4, 32, dtype=torch.uint8), 5)


def test_zero_point_zero_cannot_be_written_in_v1() -> None:
    zeros = torch.full((2, 8), 5, dtype=torch.int32)
    zeros[1, 3] = 0
    with pytest.raises(ZeroPointNotRepresentable, match="quant.sym=true"):
        pack_qzeros(zeros, 4)


def test_codes_outside_the_bit_width_are_rejected() -> None:
    codes = torch.zeros(4, 8, dtype=torch.uint8)
    codes[2, 5] = 16
    with pytest.raises(CodesOutOfRange, match="\\[0, 16\\]"):
        pack_qweight(codes, 4)


def _random_result(n: int, k: int, bits: int, group: int, seed: int) -> GPTQResult:
    g = torch.Generator().manual_seed(seed)
    return GPTQResult(codes=torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8),
                      scales=torch.rand(k // group, n, generator=g).half().float(),
                      zeros=torch.randint(1, 2**bits, (k // group, n), generator=g, dtype=torch.int32),
                      g_idx=(torch.randperm(k, generator=g) // group).to(torch.int32), loss=0.0, damp_percent=0.01)


@pytest.mark.parametrize("bits", [3, 4, 8])
def test_pack_linears_is_bitwise_pack_linear_of_each(bits: int) -> None:
    """Layers of mixed widths, group counts and g_idx, packed in one call, equal each packed alone."""
    shapes = [(64, 128, 32), (96, 128, 32), (32, 64, 32), (64, 128, 64), (64, 128, 32)]
    results = [_random_result(n, k, bits, group, seed) for seed, (n, k, group) in enumerate(shapes)]
    for got, result in zip(pack_linears(results, bits), results, strict=True):
        want = pack_linear(result, bits)
        for field in PACKED_FIELDS:
            assert torch.equal(getattr(got, field), getattr(want, field)), field
            assert getattr(got, field).is_contiguous()


def test_pack_linears_raises_for_the_layer_pack_linear_rejects() -> None:
    results = [_random_result(64, 128, 4, 32, seed) for seed in range(3)]
    bad = results[1].codes.clone()
    bad[5, 7] = 16
    results[1] = GPTQResult(**{**results[1].__dict__, "codes": bad})
    with pytest.raises(CodesOutOfRange, match="\\[0, 16\\]"):
        pack_linears(results, 4)
    with pytest.raises(UnpackableShape, match="out_features \\(N\\)=16"):
        pack_linears([_random_result(64, 128, 3, 32, 0), _random_result(16, 128, 3, 32, 1)], 3)

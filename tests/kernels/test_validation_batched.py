"""validate_packed_layers: many layers (a MoE block's experts) in few gemm calls give each layer the numbers
and the errors validate_packed_layer gives it alone."""

import dataclasses

import pytest
import torch

from rayquant.kernels import validation
from rayquant.kernels.dequant_gemm import dequant_gemm, dequant_gemm_reference
from rayquant.kernels.validation import (EmptyValidationInput, KernelMismatch, validate_packed_layer,
                                         validate_packed_layers)
from rayquant.solver.gptq import GPTQConfig, dequantize
from rayquant.solver.pack import PackedLinear, pack_linear
from rayquant.solver.rtn import quantize_rtn

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton kernel needs a CUDA GPU")


@dataclasses.dataclass(frozen=True)
class Layers:
    xs: list[torch.Tensor]         # [M_i, K_i]; an input group's linears share one tensor
    packed: list[PackedLinear]
    expected: list[torch.Tensor]   # [N_i, K_i] the solver's dequantized weights
    names: list[str]


def _experts(bits: int, n_experts: int, desc_act: bool, seed: int, device: str = "cpu",
             dtype: torch.dtype = torch.float32) -> Layers:
    """Per expert: gate/up [64, 128] sharing x_e, down [128, 64] on its own x; plus 2 narrow layers (N = 32,
    the fewest output channels that pack at 3 bits) sharing one x. Token counts differ between experts."""
    gen = torch.Generator().manual_seed(seed)
    cfg = GPTQConfig(bits=bits, group_size=32, desc_act=desc_act, sym=bits != 3)
    xs, packed, expected, names = [], [], [], []

    def add(name: str, x: torch.Tensor, N: int) -> None:
        K = x.shape[1]
        result = quantize_rtn(torch.randn(N, K, generator=gen) * 0.05, x.T @ x + torch.eye(K), x.shape[0], cfg)
        xs.append(x.to(device, dtype)), names.append(name)
        packed.append(PackedLinear(*(t.to(device) for t in dataclasses.astuple(pack_linear(result, bits)))))
        expected.append(dequantize(result.codes, result.scales, result.zeros, result.g_idx).to(device))

    for e in range(n_experts):
        x = torch.randn(20 + e % 3, 128, generator=gen)
        add(f"experts.{e}.gate_proj", x, 64)
        add(f"experts.{e}.up_proj", x, 64)
        add(f"experts.{e}.down_proj", torch.randn(20 + e % 2, 64, generator=gen), 128)
    x = torch.randn(17, 128, generator=gen)
    add("shared_expert.gate_proj", x, 32)
    add("shared_expert.up_proj", x, 32)
    return Layers(xs, packed, expected, names)


class CountedGemm:
    """The reference dequant-GEMM, counting its calls."""

    def __init__(self, gemm=dequant_gemm_reference) -> None:
        self.gemm, self.calls = gemm, 0

    def __call__(self, x: torch.Tensor, packed: PackedLinear, bits: int) -> torch.Tensor:
        self.calls += 1
        return self.gemm(x, packed, bits)


def _one_by_one(layers: Layers, bits: int, gemm=dequant_gemm_reference) -> list[validation.LayerValidation]:
    return [validate_packed_layer(x, p, bits, w, tolerance=1.0, gemm=gemm)
            for x, p, w in zip(layers.xs, layers.packed, layers.expected)]


def _assert_close(checks, alone, abs_err: float) -> None:
    for check, one in zip(checks, alone, strict=True):
        assert check.max_rel_err == pytest.approx(one.max_rel_err, rel=1e-3, abs=abs_err)
        assert check.mean_rel_err == pytest.approx(one.mean_rel_err, rel=1e-3, abs=abs_err)
        assert 0.0 < check.mean_rel_err <= check.max_rel_err


@pytest.mark.parametrize("bits,desc_act", [(2, False), (3, False), (4, False), (4, True), (8, False), (8, True)])
def test_many_layers_give_the_numbers_of_one_by_one_in_few_gemm_calls(bits: int, desc_act: bool,
                                                                     monkeypatch) -> None:
    monkeypatch.setattr(validation, "BATCHED_DEVICES", ("cpu",))  # as on CUDA: layers share calls
    layers = _experts(bits, n_experts=6, desc_act=desc_act, seed=bits)
    gemm = CountedGemm()
    checks = validate_packed_layers(layers.xs, layers.packed, bits, layers.expected, 1e-3, gemm, layers.names)
    # float32 gemm against the float64 expectation: ~1e-7, the same up to the gemm's summation order
    _assert_close(checks, _one_by_one(layers, bits), abs_err=1e-8)
    assert max(c.max_rel_err for c in checks) < 1e-6
    # one gemm per in_features without act-order; with it, layers sharing a g_idx (an expert's gate/up, whose
    # Hessian is one) still share a call: 6 gate/up pairs + 6 down + the shared pair
    assert gemm.calls == (13 if desc_act else 2)


def test_on_the_cpu_every_layer_takes_its_own_call_and_gets_bitwise_its_numbers() -> None:
    layers = _experts(4, n_experts=6, desc_act=False, seed=12)
    gemm = CountedGemm()
    checks = validate_packed_layers(layers.xs, layers.packed, 4, layers.expected, 1e-3, gemm, layers.names)
    assert gemm.calls == 20
    assert [dataclasses.astuple(c) for c in checks] == [dataclasses.astuple(c) for c in _one_by_one(layers, 4)]


def test_float64_activations_give_bitwise_the_numbers_of_one_by_one_in_shared_calls(monkeypatch) -> None:
    monkeypatch.setattr(validation, "BATCHED_DEVICES", ("cpu",))
    layers = _experts(4, n_experts=5, desc_act=False, seed=11, dtype=torch.float64)
    checks = validate_packed_layers(layers.xs, layers.packed, 4, layers.expected, 1e-3, names=layers.names)
    alone = _one_by_one(layers, 4)
    assert [dataclasses.astuple(c) for c in checks] == [dataclasses.astuple(c) for c in alone]


def test_chunks_stay_under_the_element_budget_and_give_the_same_numbers(monkeypatch) -> None:
    monkeypatch.setattr(validation, "BATCHED_DEVICES", ("cpu",))
    layers = _experts(4, n_experts=10, desc_act=False, seed=4)
    whole = validate_packed_layers(layers.xs, layers.packed, 4, layers.expected, 1e-3)
    shapes = []

    def recording_gemm(x: torch.Tensor, packed: PackedLinear, bits: int) -> torch.Tensor:
        shapes.append((x.shape[0], packed.scales.shape[1], x.shape[1]))
        return dequant_gemm_reference(x, packed, bits)

    budget = 64 * 128 * 4  # ~8 gate/up/down layers' weights of 64 x 128 per chunk
    monkeypatch.setattr(validation, "VALIDATION_CHUNK_ELEMENTS", budget)
    chunked = validate_packed_layers(layers.xs, layers.packed, 4, layers.expected, 1e-3, recording_gemm)
    assert len(shapes) > 2  # the 128-wide layers of 10 experts no longer fit one call
    assert all(max(M * N, N * K, M * K) <= budget for M, N, K in shapes)
    _assert_close(chunked, whole, abs_err=1e-8)


@pytest.mark.parametrize("batched", [False, True])
def test_a_corrupted_layer_among_20_is_named_with_its_numbers(batched: bool, monkeypatch) -> None:
    monkeypatch.setattr(validation, "BATCHED_DEVICES", ("cpu",) if batched else ())
    layers = _experts(4, n_experts=6, desc_act=False, seed=5)
    assert len(layers.packed) == 20
    bad = 13  # experts.4.up_proj
    scales = layers.packed[bad].scales.clone()
    scales[1, 7] *= 2  # one group of one output channel
    packed = list(layers.packed)
    packed[bad] = dataclasses.replace(packed[bad], scales=scales)
    with pytest.raises(KernelMismatch) as err:
        validate_packed_layers(layers.xs, packed, 4, layers.expected, 1e-3, names=layers.names)
    message = str(err.value)
    alone = validate_packed_layer(layers.xs[bad], packed[bad], 4, layers.expected[bad], tolerance=1.0)
    assert message.startswith("experts.4.up_proj: packed layer output differs")
    assert f"max relative error {alone.max_rel_err:.3g} > tolerance 0.001" in message
    assert f"{layers.xs[bad].shape[0]} tokens, in_features=128, out_features=64, bits=4" in message
    with pytest.raises(KernelMismatch, match=r"^layer 13: packed layer output differs"):
        validate_packed_layers(layers.xs, packed, 4, layers.expected, 1e-3)


def test_a_layer_without_validation_tokens_is_named() -> None:
    layers = _experts(4, n_experts=2, desc_act=False, seed=6)
    xs = list(layers.xs)
    xs[4] = xs[4][:0]
    with pytest.raises(EmptyValidationInput, match=r"^experts\.1\.up_proj: .*raise calibration\.eval_samples"):
        validate_packed_layers(xs, layers.packed, 4, layers.expected, 1e-3, names=layers.names)


@needs_cuda
@pytest.mark.parametrize("bits,desc_act", [(4, False), (4, True), (8, False)])
def test_batched_triton_validation_matches_one_by_one_on_cuda(bits: int, desc_act: bool) -> None:
    layers = _experts(bits, n_experts=8, desc_act=desc_act, seed=bits, device="cuda", dtype=torch.float16)
    gemm = CountedGemm(dequant_gemm)  # the Triton kernel for float16 x at 4 and 8 bits
    checks = validate_packed_layers(layers.xs, layers.packed, bits, layers.expected, 2e-3, gemm, layers.names)
    alone = _one_by_one(layers, bits, gemm=gemm)
    assert gemm.calls == (17 if desc_act else 2) + len(alone)
    for check, one in zip(checks, alone, strict=True):  # float16 outputs: each call rounds its own way
        assert 0.0 < check.mean_rel_err <= check.max_rel_err < 2e-3
        assert check.max_rel_err == pytest.approx(one.max_rel_err, rel=0.5)

"""validate_packed_layer: passes on a correct layer, names the numbers when a layer is wrong."""

import dataclasses

import pytest
import torch

from rayquant.kernels.dequant_gemm import dequant_gemm_reference
from rayquant.kernels.validation import EmptyValidationInput, KernelMismatch, validate_packed_layer
from rayquant.solver.gptq import GPTQConfig, GPTQResult, dequantize, solve_gptq
from rayquant.solver.pack import PackedLinear, pack_linear


def _layer() -> tuple[GPTQResult, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, 128, generator=gen)
    weight = torch.randn(64, 128, generator=gen) * 0.05
    result = solve_gptq(weight, x.T @ x, 256, GPTQConfig(bits=4, group_size=32, desc_act=True))
    held_out = torch.randn(32, 128, generator=gen)
    return result, held_out, dequantize(result.codes, result.scales, result.zeros, result.g_idx)


def test_correct_packed_layer_passes_at_float32_roundoff() -> None:
    result, x, expected = _layer()
    check = validate_packed_layer(x, pack_linear(result, 4), 4, expected, tolerance=1e-3)
    assert 0.0 <= check.mean_rel_err <= check.max_rel_err < 1e-6  # float32 kernel vs float64 expectation


def test_corrupted_scale_raises_kernel_mismatch_with_the_numbers() -> None:
    result, x, expected = _layer()
    packed = pack_linear(result, 4)
    scales = packed.scales.clone()
    scales[1, 7] *= 2  # one group of one output channel
    corrupted = dataclasses.replace(packed, scales=scales)
    with pytest.raises(KernelMismatch) as err:
        validate_packed_layer(x, corrupted, 4, expected, tolerance=1e-3)
    message = str(err.value)
    assert "max relative error" in message and "> tolerance 0.001" in message
    assert "in_features=128" in message and "out_features=64" in message and "bits=4" in message


def test_a_kernel_with_bfloat16_rounding_passes_a_loose_tolerance_and_reports_its_error() -> None:
    result, x, expected = _layer()

    def bf16_kernel(x: torch.Tensor, packed: PackedLinear, bits: int) -> torch.Tensor:
        return dequant_gemm_reference(x.bfloat16(), packed, bits).float()

    check = validate_packed_layer(x, pack_linear(result, 4), 4, expected, tolerance=2e-2, gemm=bf16_kernel)
    assert 1e-4 < check.mean_rel_err <= check.max_rel_err < 2e-2
    with pytest.raises(KernelMismatch):
        validate_packed_layer(x, pack_linear(result, 4), 4, expected, tolerance=1e-5, gemm=bf16_kernel)


def test_non_finite_kernel_output_is_a_mismatch() -> None:
    result, x, expected = _layer()

    def nan_kernel(x: torch.Tensor, packed: PackedLinear, bits: int) -> torch.Tensor:
        return torch.full((x.shape[0], 64), float("nan"))

    with pytest.raises(KernelMismatch, match="nan"):
        validate_packed_layer(x, pack_linear(result, 4), 4, expected, tolerance=1.0, gemm=nan_kernel)


def test_no_validation_tokens_is_refused() -> None:
    result, _, expected = _layer()
    with pytest.raises(EmptyValidationInput, match="calibration.eval_samples"):
        validate_packed_layer(torch.zeros(0, 128), pack_linear(result, 4), 4, expected, tolerance=1e-3)

"""solve_gptq / solve_input_group behaviour beyond the textbook comparison: input groups, dead
inputs, damping, failures, and the contract of the result."""

import math

import pytest
import torch

from rayquant.solver.gptq import (GPTQConfig, HessianNotPositiveDefinite, InvalidGPTQConfig, dequantize,
                                  solve_gptq, solve_input_group)
from rayquant.solver.hessian import InvalidSolverInput, NonFiniteSolverInput
from tests.solver.calibration_cases import correlated_activations, layer_case
from tests.solver.textbook_gptq import textbook_gptq

CFG = GPTQConfig(bits=4, group_size=32, desc_act=True)


def _loss_in_float64(weight: torch.Tensor, Q: torch.Tensor, hessian_sum: torch.Tensor, n_tokens: int) -> float:
    E = weight.double() - Q.double()
    return float(torch.trace(E @ (hessian_sum.double() / n_tokens) @ E.T))


def test_input_group_stacked_solve_equals_solving_each_linear() -> None:
    case = layer_case(out_features=96, seed=3)
    q, k, v = case.weight[:48].double(), case.weight[48:64].double(), case.weight[64:].double()
    stacked = solve_input_group([q, k, v], case.hessian_sum, case.n_tokens, CFG)
    alone = [solve_gptq(w, case.hessian_sum, case.n_tokens, CFG) for w in (q, k, v)]
    for s, a, w in zip(stacked, alone, (q, k, v)):
        assert s.codes.shape == w.shape
        assert s.loss == pytest.approx(a.loss, rel=1e-9)
        assert torch.equal(s.codes, a.codes)
        assert torch.equal(s.scales, a.scales)
    whole = solve_gptq(case.weight.double(), case.hessian_sum, case.n_tokens, CFG)
    assert sum(s.loss for s in stacked) == pytest.approx(whole.loss, rel=1e-9)


def test_input_group_in_float32_matches_per_linear_losses() -> None:
    case = layer_case(out_features=96, seed=4)
    gate, up = case.weight[:40], case.weight[40:]
    stacked = solve_input_group([gate, up], case.hessian_sum, case.n_tokens, CFG)
    alone = [solve_gptq(w, case.hessian_sum, case.n_tokens, CFG) for w in (gate, up)]
    for s, a in zip(stacked, alone):
        assert s.loss == pytest.approx(a.loss, rel=1e-3)


def test_loss_is_the_output_error_of_the_stored_checkpoint_values() -> None:
    case = layer_case(out_features=64, seed=5)
    result = solve_gptq(case.weight, case.hessian_sum, case.n_tokens, GPTQConfig(bits=3, group_size=64, sym=False))
    assert torch.equal(result.scales, result.scales.half().float())  # float16-representable
    assert result.codes.dtype == torch.uint8 and result.zeros.dtype == torch.int32
    assert result.g_idx.dtype == torch.int32 and result.scales.dtype == torch.float32
    assert result.scales.shape == (4, 64) and result.zeros.shape == (4, 64)
    assert int(result.codes.max()) <= 7 and int(result.zeros.max()) <= 7
    Q = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
    assert result.loss == pytest.approx(_loss_in_float64(case.weight, Q, case.hessian_sum, case.n_tokens), rel=1e-4)


def test_g_idx_follows_act_order_unless_groups_are_static() -> None:
    case = layer_case(out_features=32, seed=6)
    perm = torch.argsort(torch.diag(case.hessian_sum), descending=True, stable=True)
    dynamic = solve_gptq(case.weight, case.hessian_sum, case.n_tokens, GPTQConfig(group_size=48, desc_act=True))
    expected = torch.empty(256, dtype=torch.int64)
    expected[perm] = torch.arange(256) // 48
    assert torch.equal(dynamic.g_idx.long(), expected)
    assert int(dynamic.g_idx.max()) == 5  # 256 = 5·48 + 16: the last group is partial
    static = solve_gptq(case.weight, case.hessian_sum, case.n_tokens,
                        GPTQConfig(group_size=48, desc_act=True, static_groups=True))
    assert torch.equal(static.g_idx.long(), torch.arange(256) // 48)
    one_group = solve_gptq(case.weight, case.hessian_sum, case.n_tokens, GPTQConfig(group_size=-1, desc_act=True))
    assert torch.equal(one_group.g_idx, torch.zeros(256, dtype=torch.int32))
    assert one_group.scales.shape == (1, 32)


def test_dead_input_column_quantizes_to_zero_and_is_solved_like_the_textbook() -> None:
    x = correlated_activations(1024, 128, seed=7)
    x[:, [5, 77]] = 0.0  # two input channels never active
    hessian_sum = x.T @ x
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.02
    for cfg in (GPTQConfig(bits=4, group_size=32), GPTQConfig(bits=3, group_size=-1, desc_act=True, sym=False)):
        result = solve_gptq(weight, hessian_sum, 1024, cfg)
        Q = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
        assert torch.equal(Q[:, [5, 77]], torch.zeros(48, 2))
        assert result.damp_percent == cfg.damp_percent
        textbook = textbook_gptq(weight, hessian_sum, 1024, cfg)
        assert torch.equal(result.codes.long(), textbook.codes)
        # the dead channels cost nothing: the loss is the true output error with the raw H
        assert result.loss == pytest.approx(_loss_in_float64(weight, Q, hessian_sum, 1024), rel=1e-9)


def _indefinite_hessian(in_features: int, min_eigenvalue_over_mean_diag: float) -> torch.Tensor:
    """Σxᵀx-like matrix whose smallest eigenvalue is a given (negative) fraction of mean(diag)."""
    gen = torch.Generator().manual_seed(11)
    basis, _ = torch.linalg.qr(torch.randn(in_features, in_features, generator=gen, dtype=torch.float64))
    eigenvalues = torch.linspace(1.0, 3.0, in_features, dtype=torch.float64)
    eigenvalues[0] = 0.0
    eigenvalues[0] = min_eigenvalue_over_mean_diag * eigenvalues.mean() / (1 - min_eigenvalue_over_mean_diag / in_features)
    return ((basis * eigenvalues) @ basis.T).float()


def test_damping_grows_until_cholesky_succeeds_and_is_recorded() -> None:
    hessian_sum = _indefinite_hessian(64, -0.015)  # fails at 1 % damping, succeeds at 2 %
    mean_diag = float(torch.diag(hessian_sum.double()).mean())
    assert float(torch.linalg.eigvalsh(hessian_sum.double())[0]) == pytest.approx(-0.015 * mean_diag, rel=1e-3)
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    result = solve_gptq(weight, hessian_sum, 100, GPTQConfig(bits=4, group_size=32))
    assert result.damp_percent == 0.02
    textbook = textbook_gptq(weight, hessian_sum, 100, GPTQConfig(bits=4, group_size=32, damp_percent=0.02))
    assert torch.equal(result.codes.long(), textbook.codes)
    with pytest.raises(HessianNotPositiveDefinite):
        solve_gptq(weight, hessian_sum, 100, GPTQConfig(bits=4, group_size=32, damp_auto_increment=0.0))


def test_hessian_that_no_damping_fixes_raises_with_the_fix_in_the_message() -> None:
    negative_definite = -(torch.eye(32) + 0.1)
    weight = torch.randn(8, 32, generator=torch.Generator().manual_seed(13))
    with pytest.raises(HessianNotPositiveDefinite) as err:
        solve_gptq(weight, negative_definite, 333, GPTQConfig(bits=4, group_size=-1))
    message = str(err.value)
    assert "quant.damp_percent" in message and "calibration.n_samples" in message
    assert "n_tokens=333" in message and "0.01 to 1.0" in message
    assert err.value.damp_tried[0] == 0.01 and err.value.damp_tried[-1] == 1.0 and len(err.value.damp_tried) == 100


@pytest.mark.parametrize("where", ["weight", "hessian_sum"])
def test_non_finite_inputs_are_rejected(where: str) -> None:
    case = layer_case(out_features=8, in_features=32, n_tokens=64)
    weight, hessian_sum = case.weight.clone(), case.hessian_sum.clone()
    (weight if where == "weight" else hessian_sum)[3, 4] = float("nan" if where == "weight" else "inf")
    with pytest.raises(NonFiniteSolverInput, match=where) as err:
        solve_gptq(weight, hessian_sum, case.n_tokens, CFG)
    assert isinstance(err.value, ValueError)


def test_inconsistent_shapes_and_empty_token_counts_are_rejected() -> None:
    case = layer_case(out_features=8, in_features=32, n_tokens=64)
    with pytest.raises(InvalidSolverInput, match="in_features"):
        solve_gptq(case.weight[:, :16], case.hessian_sum, case.n_tokens, CFG)
    with pytest.raises(InvalidSolverInput, match="calibration.n_samples"):
        solve_gptq(case.weight, case.hessian_sum, 0, CFG)
    with pytest.raises(InvalidSolverInput):
        solve_input_group([case.weight, case.weight[:, :16]], case.hessian_sum, case.n_tokens, CFG)


def test_invalid_config_names_the_spec_field() -> None:
    with pytest.raises(InvalidGPTQConfig, match="quant.bits=5"):
        GPTQConfig(bits=5)
    with pytest.raises(InvalidGPTQConfig, match="quant.group_size=0"):
        GPTQConfig(group_size=0)


def test_caller_tensors_are_not_modified() -> None:
    x = correlated_activations(256, 64, seed=14)
    x[:, 3] = 0.0  # a dead column: the solver zeroes W[:, 3] and sets H[3, 3], on its own copies
    hessian_sum = x.T @ x
    weight = torch.randn(16, 64, generator=torch.Generator().manual_seed(14))
    weight_before, hessian_before = weight.clone(), hessian_sum.clone()
    solve_input_group([weight, weight[:8]], hessian_sum, 256, GPTQConfig(group_size=16, desc_act=True))
    solve_gptq(weight, hessian_sum, 256, GPTQConfig(group_size=16, static_groups=True))
    assert torch.equal(weight, weight_before) and torch.equal(hessian_sum, hessian_before)


def test_bfloat16_weights_are_solved_in_float32() -> None:
    case = layer_case(out_features=32, seed=15)
    weight = case.weight.bfloat16()
    from_bf16 = solve_gptq(weight, case.hessian_sum, case.n_tokens, CFG)
    from_fp32 = solve_gptq(weight.float(), case.hessian_sum, case.n_tokens, CFG)
    assert torch.equal(from_bf16.codes, from_fp32.codes) and from_bf16.loss == from_fp32.loss
    assert math.isfinite(from_bf16.loss) and from_bf16.scales.dtype == torch.float32


def test_reversed_cholesky_gives_the_cholesky_factor_of_the_damped_inverse(monkeypatch) -> None:
    from rayquant.solver import gptq
    monkeypatch.setattr(gptq, "TRIANGULAR_SOLVE_MAX", 16)  # K = 100: the inverse by halves down to 12-13 columns
    x = correlated_activations(512, 100, seed=16).double()
    H = x.T @ x / 512
    Ls, _, damping = gptq._cholesky_factors(H[None], [512], GPTQConfig(damp_percent=0.01), None)
    L = Ls[0]
    damped = H + 0.01 * torch.diagonal(H).mean() * torch.eye(100, dtype=torch.float64)
    R = L.flip(0, 1)  # what the fused path uses: H + λI = R Rᵀ, R upper
    assert torch.equal(R, torch.triu(R))
    torch.testing.assert_close(R @ R.T, damped, rtol=1e-12, atol=1e-12)
    U = gptq._invert_lower(L).flip(0, 1)  # what the torch loop uses: U = R⁻¹
    assert torch.equal(U, torch.triu(U))
    torch.testing.assert_close(U, torch.linalg.cholesky(torch.linalg.inv(damped), upper=True), rtol=1e-9, atol=1e-12)
    assert damping[0] == pytest.approx(0.01 * float(torch.diagonal(H).mean()), rel=1e-12)

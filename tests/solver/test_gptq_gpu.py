"""The CUDA path of the solver: the fused Triton column loop (solver/gptq_fused.py) against the textbook
algorithm, as test_gptq_vs_textbook.py checks the torch loop; and Hessians from bf16 activations.

Skipped without CUDA or triton (CI). The textbook runs on the CPU (float64); the solver on the GPU.
"""

import functools
import importlib.util

import pytest
import torch

from rayquant.solver.gptq import (GPTQConfig, GPTQResult, GroupProblem, _runs_fused, dequantize, solve_gptq,
                                  solve_input_group, solve_input_groups)
from rayquant.solver.grid import ScaleNotRepresentable
from rayquant.solver.hessian import accumulate_hessian
from rayquant.solver.rtn import quantize_rtn
from tests.solver.calibration_cases import correlated_activations, layer_case
from tests.solver.test_gptq_vs_textbook import _id, _layer, _textbook
from tests.solver.textbook_gptq import textbook_gptq

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or importlib.util.find_spec("triton") is None,
                       reason="needs CUDA and triton (the fused solver path)"),
]

CUDA = torch.device("cuda")

# every kernel variant (bits, sym/asym, grids in the kernel / before it / static, act-order) once; the
# CPU suite runs the whole matrix against the torch loop
CASES = ([dict(bits=b, group_size=128, desc_act=False, sym=True) for b in (2, 3, 4, 8)]
         + [dict(bits=b, group_size=32, desc_act=True, sym=False) for b in (2, 3, 4, 8)]
         + [dict(bits=b, group_size=-1, desc_act=True, sym=b in (2, 8)) for b in (2, 3, 4, 8)]
         + [dict(bits=4, group_size=32, desc_act=True, sym=True, static_groups=True),
            dict(bits=3, group_size=128, desc_act=True, sym=False, static_groups=True),
            dict(bits=2, group_size=32, desc_act=False, sym=False, static_groups=True),
            dict(bits=8, group_size=128, desc_act=True, sym=True, static_groups=True),
            dict(bits=4, group_size=128, act_group_aware=True, sym=True),  # GAR, as the job spec's default
            dict(bits=3, group_size=96, act_group_aware=True, sym=False),  # GAR, partial last group
            dict(bits=4, group_size=32, act_group_aware=True, sym=True, static_groups=True)])


def _solve(cfg: GPTQConfig, dtype: torch.dtype) -> GPTQResult:
    layer = _layer()
    return solve_gptq(layer.weight.to(CUDA, dtype), layer.hessian_sum.to(CUDA), layer.n_tokens, cfg)


def _direct_loss(weight: torch.Tensor, result: GPTQResult, hessian_sum: torch.Tensor, n_tokens: int) -> float:
    E = weight.double().cpu() - dequantize(result.codes, result.scales, result.zeros, result.g_idx).double().cpu()
    return float(((E @ (hessian_sum.double().cpu() / n_tokens)) * E).sum())


def test_cuda_solves_run_the_fused_column_loop() -> None:
    assert _runs_fused(torch.zeros(2, 2, device=CUDA))
    assert not _runs_fused(torch.zeros(2, 2))


@pytest.mark.parametrize("params", CASES, ids=_id)
def test_float64_codes_equal_textbook_gptq_on_cuda(params: dict) -> None:
    cfg = GPTQConfig(**params)
    textbook = _textbook(cfg)
    exact = _solve(cfg, torch.float64)
    assert exact.codes.is_cuda
    same_codes = (exact.codes.cpu().long() == textbook.codes).double().mean().item()
    assert same_codes >= 0.999, f"only {same_codes:.4%} of codes equal the textbook's"
    assert torch.equal(exact.g_idx.cpu().long(), textbook.g_idx)
    assert (exact.scales.cpu().double() == textbook.scales).double().mean().item() >= 0.999
    assert exact.loss == pytest.approx(textbook.loss, rel=1e-6)


@pytest.mark.parametrize("params", CASES, ids=_id)
def test_float32_loss_within_0p1_percent_of_textbook_and_below_rtn_on_cuda(params: dict) -> None:
    cfg = GPTQConfig(**params)
    layer = _layer()
    textbook = _textbook(cfg)
    production = _solve(cfg, torch.float32)
    assert abs(production.loss - textbook.loss) <= 1e-3 * textbook.loss, (production.loss, textbook.loss)
    assert production.loss == pytest.approx(_direct_loss(layer.weight, production, layer.hessian_sum, layer.n_tokens),
                                            rel=1e-5)
    rtn = quantize_rtn(layer.weight, layer.hessian_sum, layer.n_tokens, cfg)
    assert production.loss < rtn.loss


@pytest.mark.parametrize("params", [
    dict(bits=4, group_size=32, desc_act=True, column_batch=20),    # groups straddle column batches
    dict(bits=3, group_size=128, desc_act=False, sym=False, column_batch=48),
    dict(bits=2, group_size=-1, desc_act=True, column_batch=100),    # the last batch is partial
    dict(bits=4, group_size=96, desc_act=True, column_batch=1),      # last group partial (256 = 2·96 + 64)
    dict(bits=4, group_size=200, desc_act=True, column_batch=128),   # groups wider than a batch, cut at starts
], ids=_id)
def test_result_does_not_depend_on_column_batch_on_cuda(params: dict) -> None:
    cfg = GPTQConfig(**params)
    layer = _layer()
    textbook = textbook_gptq(layer.weight, layer.hessian_sum, layer.n_tokens, cfg)
    exact = _solve(cfg, torch.float64)
    assert (exact.codes.cpu().long() == textbook.codes).double().mean().item() >= 0.999
    unbatched = _solve(GPTQConfig(**{**params, "column_batch": 256}), torch.float64)
    assert (exact.codes == unbatched.codes).double().mean().item() >= 0.999
    assert exact.loss == pytest.approx(unbatched.loss, rel=1e-9)


def test_input_group_stacked_solve_equals_solving_each_linear_on_cuda() -> None:
    case = layer_case(out_features=96, seed=3)
    cfg = GPTQConfig(bits=4, group_size=32, desc_act=True)
    hessian_sum = case.hessian_sum.to(CUDA)
    q, k, v = (w.to(CUDA, torch.float64) for w in (case.weight[:48], case.weight[48:64], case.weight[64:]))
    stacked = solve_input_group([q, k, v], hessian_sum, case.n_tokens, cfg)
    alone = [solve_gptq(w, hessian_sum, case.n_tokens, cfg) for w in (q, k, v)]
    for s, a in zip(stacked, alone):
        assert torch.equal(s.codes, a.codes) and torch.equal(s.scales, a.scales)
        assert s.loss == pytest.approx(a.loss, rel=1e-9)


def test_dead_inputs_and_damping_increments_match_the_textbook_on_cuda() -> None:
    x = correlated_activations(1024, 128, seed=7)
    x[:, [5, 77]] = 0.0
    hessian_sum = x.T @ x
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(7), dtype=torch.float64) * 0.02
    cfg = GPTQConfig(bits=3, group_size=-1, desc_act=True, sym=False)
    result = solve_gptq(weight.to(CUDA), hessian_sum.to(CUDA), 1024, cfg)
    Q = dequantize(result.codes, result.scales, result.zeros, result.g_idx).cpu()
    assert torch.equal(Q[:, [5, 77]], torch.zeros(48, 2))
    assert torch.equal(result.codes.cpu().long(), textbook_gptq(weight, hessian_sum, 1024, cfg).codes)


def test_a_scale_beyond_float16_is_refused_on_cuda() -> None:
    case = layer_case(out_features=32, in_features=256, n_tokens=512, seed=8)
    weight = case.weight.clone()
    weight[3, 200] = 1e7  # 4-bit range 2e7 / 15 > 65504
    with pytest.raises(ScaleNotRepresentable, match="float16"):
        solve_gptq(weight.to(CUDA), case.hessian_sum.to(CUDA), case.n_tokens, GPTQConfig(bits=4, group_size=128))


@functools.cache
def _wide_case() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device=CUDA).manual_seed(9)
    K, T = 4096, 8192
    x = torch.randn(T, K, generator=gen, device=CUDA) + torch.randn(T, 32, generator=gen, device=CUDA) @ (
        torch.randn(32, K, generator=gen, device=CUDA) * 0.5)
    x *= torch.exp(0.5 * torch.randn(K, generator=gen, device=CUDA))
    x[:, :: K // 32] *= 20.0  # outlier channels
    weight = torch.randn(512, K, generator=gen, device=CUDA) * 0.02
    return weight, x.T @ x


@pytest.mark.parametrize("desc_act", [False, True])
def test_loss_from_the_scaled_errors_equals_the_output_error_at_k_4096(desc_act: bool) -> None:
    # K > the solver's triangular-solve size: the factor is built from halves; the loss comes from ‖E‖²
    weight, hessian_sum = _wide_case()
    result = solve_gptq(weight, hessian_sum, 8192, GPTQConfig(bits=4, group_size=128, desc_act=desc_act))
    Q = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
    E = (weight - Q).double()
    direct = float(((E @ (hessian_sum.double() / 8192)) * E).sum())
    assert result.loss == pytest.approx(direct, rel=1e-4)
    rtn = quantize_rtn(weight, hessian_sum, 8192, GPTQConfig(bits=4, group_size=128, desc_act=desc_act))
    assert result.loss < rtn.loss


def test_bf16_activations_accumulate_on_tensor_cores_within_1e_5_of_fp32() -> None:
    gen = torch.Generator(device=CUDA).manual_seed(10)
    K = 5000  # blocks of 4096 and 904 above the diagonal, mirrored below
    scale = torch.exp(0.5 * torch.randn(K, generator=gen, device=CUDA))
    fast = torch.zeros(K, K, device=CUDA)
    fp32 = torch.zeros(K, K, device=CUDA)
    for _ in range(3):
        x = ((torch.randn(3, 2000, K, generator=gen, device=CUDA) + 1.0) * scale).bfloat16()
        assert accumulate_hessian(fast, x) == 6000
        xf = x.reshape(-1, K).float()
        fp32.addmm_(xf.T, xf)
    assert fast.dtype == torch.float32 and torch.equal(fast, fast.T)
    assert float(torch.linalg.norm(fast - fp32) / torch.linalg.norm(fp32)) <= 1e-5


@pytest.mark.parametrize("params", [dict(act_group_aware=True), dict(desc_act=True, sym=False, group_size=-1)], ids=_id)
def test_batched_expert_solves_on_cuda_within_0p1_percent_of_each_alone(params: dict) -> None:
    """An MoE stage's shapes at 1/8 scale: 16 experts' gate/up [2 × 96, 256] sharing one Hessian (one stacked
    solve) and their down projections [256, 96] with Hessians of their own (one batched solve): every
    expert's loss within 0.1 % of its solve alone (cuBLAS/cuSOLVER batched calls round differently)."""
    gen = torch.Generator(device=CUDA).manual_seed(11)
    cfg = GPTQConfig(**params)

    def hessian(K: int, n: int) -> torch.Tensor:
        x = torch.randn(n, K, generator=gen, device=CUDA) * torch.exp(0.5 * torch.randn(K, generator=gen, device=CUDA))
        return x.T @ x

    shared = hessian(256, 2048)
    groups = [GroupProblem([torch.randn(96, 256, generator=gen, device=CUDA) * 0.02 for _ in range(2)], shared, 2048)
              for _ in range(16)]
    groups += [GroupProblem([torch.randn(256, 96, generator=gen, device=CUDA) * 0.02], hessian(96, 300 + e), 300 + e)
               for e in range(16)]
    together = solve_input_groups(groups, cfg)
    for g, results in zip(groups, together, strict=True):
        alone = solve_input_group(g.weights, g.hessian_sum, g.n_tokens, cfg)
        for a, b, w in zip(results, alone, g.weights, strict=True):
            assert a.loss == pytest.approx(b.loss, rel=1e-3)
            assert a.loss == pytest.approx(_direct_loss(w, a, g.hessian_sum, g.n_tokens), rel=1e-4)

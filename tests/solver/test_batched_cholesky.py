"""Cholesky by panels: the factors of torch's own (to fp rounding), a failing matrix named by info alone."""

from __future__ import annotations

import pytest
import torch

from rayquant.solver.batched_cholesky import cholesky_ex, factors_by_panels
from rayquant.solver.gptq import GPTQConfig, GroupProblem, solve_input_groups


def _hessians(E: int, K: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    X = torch.randn(E, 3 * K, K, generator=g, dtype=torch.float64)
    H = X.mT @ X / (3 * K) + 0.01 * torch.eye(K, dtype=torch.float64)
    return H.to(device=device, dtype=dtype)


@pytest.mark.parametrize("K,panel", [(40, 16), (48, 16), (33, 64)])  # ragged last panel, exact panels, one panel
def test_panels_give_torchs_factors_and_read_only_the_lower_triangle(K, panel):
    H = _hessians(3, K)
    expected = torch.linalg.cholesky(H)
    A = H.tril() + torch.full_like(H, float("nan")).triu(1)  # NaN above the diagonal
    L, info = factors_by_panels(A, panel)
    assert info.tolist() == [0, 0, 0]
    torch.testing.assert_close(L, expected, rtol=1e-12, atol=1e-12)
    assert torch.equal(L, L.tril())


def test_a_matrix_that_is_not_positive_definite_fails_alone():
    H = _hessians(3, 40)
    H[1, 20, 20] = -1.0  # leading minor 21 of matrix 1 is indefinite; 0 and 2 factor
    L, info = factors_by_panels(H.clone(), 16)
    assert info[0] == 0 and info[2] == 0 and info[1] > 0
    assert info[1] == torch.linalg.cholesky_ex(H[1])[1]  # the same leading minor torch names
    torch.testing.assert_close(L[[0, 2]], torch.linalg.cholesky(H[[0, 2]]), rtol=1e-12, atol=1e-12)


def test_cholesky_ex_keeps_torchs_own_off_cuda():
    H = _hessians(2, 40)
    L, info = cholesky_ex(H.clone())
    assert torch.equal(L, torch.linalg.cholesky(H)) and info.tolist() == [0, 0]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_expert_batch_solves_within_a_thousandth_of_cusolver(monkeypatch):
    """At an expert Hessian's width the panels run (cholesky_ex); GPTQ's losses stay within 0.1 % of the
    solve on cuSOLVER's factors."""
    E, K, N = 4, 4096, 256
    H = _hessians(E, K, torch.float32, "cuda")
    L, info = cholesky_ex(H.clone())
    assert info.tolist() == [0] * E
    torch.testing.assert_close(L, torch.linalg.cholesky(H), rtol=1e-4, atol=1e-4)
    g = torch.Generator(device="cuda").manual_seed(1)
    weights = [torch.randn(N, K, generator=g, device="cuda") for _ in range(E)]
    problems = [GroupProblem([w], H[e] * 100, 100) for e, w in enumerate(weights)]
    cfg = GPTQConfig(bits=4, group_size=128)
    panels = solve_input_groups(problems, cfg)
    monkeypatch.setattr("rayquant.solver.gptq.cholesky_ex", torch.linalg.cholesky_ex)
    cusolver = solve_input_groups(problems, cfg)
    for a, b in zip(panels, cusolver):
        assert abs(a[0].loss - b[0].loss) <= 1e-3 * b[0].loss

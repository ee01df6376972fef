"""quantize_rtn: plain rounding on the same grids as GPTQ, loss against the same H."""

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig, dequantize
from rayquant.solver.rtn import quantize_rtn
from tests.solver.calibration_cases import layer_case


def _weight_in_range(low: float, high: float, seed: int) -> torch.Tensor:
    """[4, 32] weights uniform in [low, high] with both ends present in every row."""
    gen = torch.Generator().manual_seed(seed)
    weight = low + (high - low) * torch.rand(4, 32, generator=gen)
    weight[:, 0], weight[:, 1] = low, high
    return weight


def test_asym_rtn_is_torch_round_on_the_min_max_grid() -> None:
    weight = _weight_in_range(-1.5, 6.0, seed=0)  # scale (6 + 1.5) / 15 = 0.5, zero round(1.5 / 0.5) = 3
    result = quantize_rtn(weight, torch.eye(32), 1, GPTQConfig(bits=4, group_size=-1, sym=False))
    assert torch.equal(result.scales, torch.full((1, 4), 0.5))
    assert torch.equal(result.zeros, torch.full((1, 4), 3, dtype=torch.int32))
    assert torch.equal(result.codes.long(), (torch.round(weight / 0.5) + 3).long())
    Q = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
    assert result.loss == pytest.approx(float(((weight - Q) ** 2).sum()), rel=1e-6)  # H = I


def test_sym_rtn_is_torch_round_around_the_middle_level_and_clips_the_top() -> None:
    weight = _weight_in_range(-3.75, 3.75, seed=1)  # scale 2 · 3.75 / 15 = 0.5, zero 8
    result = quantize_rtn(weight, torch.eye(32), 1, GPTQConfig(bits=4, group_size=-1, sym=True))
    assert torch.equal(result.scales, torch.full((1, 4), 0.5))
    assert torch.equal(result.zeros, torch.full((1, 4), 8, dtype=torch.int32))
    expected = torch.clamp(torch.round(weight / 0.5) + 8, 0, 15)
    assert torch.equal(result.codes.long(), expected.long())
    assert int(result.codes[:, 1].max()) == 15  # 3.75 / 0.5 + 8 = 15.5 rounds to 16: clipped


def test_rtn_loss_uses_the_hessian() -> None:
    weight = _weight_in_range(-1.0, 1.0, seed=2)
    H = torch.diag(torch.linspace(1.0, 4.0, 32))
    result = quantize_rtn(weight, 8 * H, 8, GPTQConfig(bits=3, group_size=8))
    E = weight.double() - dequantize(result.codes, result.scales, result.zeros, result.g_idx).double()
    assert result.loss == pytest.approx(float(torch.trace(E @ H.double() @ E.T)), rel=1e-6)
    assert result.damp_percent == 0.0


def test_rtn_groups_follow_act_order_like_gptq() -> None:
    case = layer_case(out_features=16, seed=3)
    cfg = GPTQConfig(bits=4, group_size=64, desc_act=True)
    result = quantize_rtn(case.weight, case.hessian_sum, case.n_tokens, cfg)
    perm = torch.argsort(torch.diag(case.hessian_sum), descending=True, stable=True)
    assert torch.equal(result.g_idx[perm].long(), torch.arange(256) // 64)
    first_group = case.weight[:, perm[:64]]
    assert torch.equal(result.scales[0], (2 * first_group.abs().amax(1) / 15).half().float())

"""The per-group grid: min-max range through 0, float16 scales, zero points GPTQ v1 can store."""

import pytest
import torch

from rayquant.solver.grid import ScaleNotRepresentable, find_grid, quantize_to_grid


def _fp16(x: float) -> float:
    return float(torch.tensor(x, dtype=torch.float64).half())


def test_scales_are_rounded_to_float16_when_computed() -> None:
    grid = find_grid(torch.tensor([[-0.1, 0.05, 0.1]], dtype=torch.float64), bits=4, sym=True)
    assert 0.2 / 15 != _fp16(0.2 / 15)
    assert float(grid.scale[0]) == _fp16(0.2 / 15) and float(grid.zero[0]) == 8


def test_asym_grid_spans_min_to_max() -> None:
    grid = find_grid(torch.tensor([[-1.0, 0.0, 2.0]], dtype=torch.float64), bits=2, sym=False)
    assert float(grid.scale[0]) == 1.0 and float(grid.zero[0]) == 1.0  # levels -1, 0, 1, 2


def test_asym_zero_point_is_never_zero_and_the_range_still_reaches_the_max() -> None:
    row = torch.tensor([[0.0, 0.5, 3.0]], dtype=torch.float64)  # round(-0 / 1.0) would be zero point 0
    grid = find_grid(row, bits=2, sym=False)
    assert float(grid.zero[0]) == 1.0 and float(grid.scale[0]) == 1.5  # 3 / (maxq - 1)
    codes = quantize_to_grid(row, grid.scale[:, None], grid.zero[:, None], 3)
    assert codes.tolist() == [[1.0, 1.0, 3.0]]  # 3.0 is level 3 exactly: nothing clipped


def test_sym_grid_of_a_row_without_negatives_is_still_symmetric() -> None:
    grid = find_grid(torch.tensor([[0.0, 1.0, 2.0]], dtype=torch.float64), bits=4, sym=True)
    assert float(grid.scale[0]) == _fp16(4 / 15) and float(grid.zero[0]) == 8


def test_all_zero_row_gets_the_unit_range() -> None:
    grid = find_grid(torch.zeros(1, 4, dtype=torch.float64), bits=3, sym=False)
    assert float(grid.scale[0]) == _fp16(2 / 7) and float(grid.zero[0]) == round(1 / _fp16(2 / 7))


def test_tiny_ranges_keep_a_positive_float16_scale() -> None:
    grid = find_grid(torch.full((1, 4), 1e-12, dtype=torch.float64), bits=8, sym=True)
    assert float(grid.scale[0]) == 2.0**-24


def test_ranges_beyond_float16_are_refused() -> None:
    with pytest.raises(ScaleNotRepresentable, match="float16"):
        find_grid(torch.tensor([[-1e6, 1e6]]), bits=4, sym=True)

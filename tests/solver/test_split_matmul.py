import pytest
import torch

from rayquant.solver.split_matmul import PRECISIONS, addmm_split_

CUDA = torch.device("cuda")
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _operands(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(96, 384, generator=gen, dtype=torch.float64)
    B = torch.randn(384, 160, generator=gen, dtype=torch.float64) * torch.logspace(-3, 3, 160, dtype=torch.float64)
    out = torch.randn(96, 160, generator=gen, dtype=torch.float64)
    return A.to(device, dtype), B.to(device, dtype), out.to(device, dtype)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_cpu_and_float64_take_the_plain_product(precision: str) -> None:
    for device, dtype in (("cpu", torch.float32), ("cpu", torch.float64)):
        A, B, out = _operands(device, dtype)
        expected = out.clone().addmm_(A, B)
        assert torch.equal(addmm_split_(out, A, B, precision), expected)


def test_unknown_precision_is_refused() -> None:
    A, B, out = _operands("cpu")
    with pytest.raises(ValueError, match="tf16"):
        addmm_split_(out, A, B, "tf16")


@needs_cuda
@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-6), ("tf32x3", 2e-6), ("bf16x3", 1e-4)])
def test_split_products_on_cuda_are_within_their_precision_of_float64(precision: str, tolerance: float) -> None:
    A, B, out = _operands(CUDA, torch.float64)
    exact = out.clone().addmm_(A, B)
    result = addmm_split_(out.float(), A.float(), B.float(), precision).double()
    # column-wise relative error: B's columns span six decades, each must keep its own precision
    err = torch.linalg.vector_norm(result - exact, dim=0) / torch.linalg.vector_norm(exact, dim=0)
    assert float(err.max()) <= tolerance, (precision, float(err.max()))
    assert not torch.backends.cuda.matmul.allow_tf32 or precision == "fp32"  # the flag was restored


@needs_cuda
def test_split_update_writes_into_a_strided_view_on_cuda() -> None:
    A, B, out = _operands(CUDA)
    wide = torch.zeros(96, 400, device=CUDA)
    wide[:, 240:] = out
    addmm_split_(wide[:, 240:], A, B, "tf32x3", alpha=-1.0)
    assert torch.equal(wide[:, :240], torch.zeros(96, 240, device=CUDA))
    exact = out.double().addmm(A.double(), B.double(), alpha=-1.0)
    err = torch.linalg.vector_norm(wide[:, 240:].double() - exact, dim=0) / torch.linalg.vector_norm(exact, dim=0)
    assert float(err.max()) <= 2e-6

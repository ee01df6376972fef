"""The Triton dequant-GEMM kernels run by Triton's CPU interpreter (no GPU) on small layers, K=512, N=256, g128:
gemv, mma and mma_swapped at 4 and 8 bits, with and without act-order, split_k 1/2/4 (split partials summed by
`_sum_splits_kernel`), against the reference. test_dequant_gemm_gpu.py runs the same kernels compiled."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from rayquant.kernels.dequant_gemm import dequant_gemm_reference
from tests.kernels import interpreted_kernel_runs as runs
from tests.kernels.test_dequant_gemm_gpu import TOLERANCE, relative_error

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory) -> dict:
    """Every case's output, from one interpreter process per bit width, side by side (TRITON_INTERPRET must
    be set before triton's import)."""
    pytest.importorskip("triton")
    folder = tmp_path_factory.mktemp("interpreted")
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    procs = {bits: subprocess.Popen([sys.executable, "-m", "tests.kernels.interpreted_kernel_runs",
                                     str(folder / f"{bits}bit.pt"), str(bits)],
                                    cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for bits in runs.BITS}
    outputs = {}
    try:
        for bits, proc in procs.items():
            _, stderr = proc.communicate(timeout=300)
            assert proc.returncode == 0, stderr[-4000:]
            outputs.update(torch.load(folder / f"{bits}bit.pt"))
    finally:
        for proc in procs.values():  # a run still going after a failure above would outlive the test run
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


@pytest.mark.parametrize("split_k", runs.SPLITS)
@pytest.mark.parametrize("bits", runs.BITS)
@pytest.mark.parametrize("act_order", runs.ACT_ORDER)
@pytest.mark.parametrize("kernel,M", runs.KERNEL_M)
def test_interpreted_kernel_matches_reference(interpreted: dict, bits: int, act_order: bool, kernel: str, M: int,
                                              split_k: int) -> None:
    packed, W, x = runs.case_inputs(bits, act_order, M)
    exact = x.double() @ W.double().T
    ref_err = relative_error(dequant_gemm_reference(x, packed, bits), exact)
    out = interpreted[(bits, act_order, kernel, M, split_k)]
    assert out.shape == (M, runs.N) and out.dtype == torch.float16
    err = relative_error(out, exact)  # NaN (a tile never written) fails too
    assert err <= TOLERANCE[torch.float16] and err <= 3 * ref_err + 1e-4, (err, ref_err)

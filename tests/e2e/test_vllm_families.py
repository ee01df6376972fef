"""vLLM (CPU) on what the dense families and quant.overrides write: fused Phi-3 layers under their
own names, and GPTQModel's `dynamic` map (skipped modules, per-module group size).

vLLM's CPU GPTQ kernel takes 4-bit symmetric weights only, so the override checkpoint here varies
group_size and skip, not bits (8-bit rules are read: vLLM then refuses the kernel, naming uint8b128).
"""

from __future__ import annotations

import pytest

from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import open_model_source

from .models import SPEC, dequantized_model, run_cli
from .test_vllm import N_PROMPTS, PROMPT_LEN, bf16_tolerance, check_vllm_matches_transformers, compare, \
    path_logprobs, require_vllm, run_vllm

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def vllm_here():
    """Skip the module before its jobs run where vLLM cannot run a GPTQ checkpoint (see test_vllm.require_vllm)."""
    return require_vllm()


# block 1's o_proj stays bf16; every down_proj gets groups of 64 (its K is 256: 4 groups, not 2)
OVERRIDES = r"[{pattern: '.*\.mlp\.down_proj', group_size: 64}, {pattern: 'model\.layers\.1\.self_attn\.o_proj', skip: true}]"


def test_vllm_loads_phi3_fused_qkv_and_gate_up_and_matches_transformers(quantize_once, tmp_path):
    require_vllm()
    out = quantize_once("model.source=synthetic://phi3-tiny").output()  # the job test_families checks
    check_vllm_matches_transformers(open_model_source("synthetic://phi3-tiny").path, out, 4, tmp_path)


def test_vllm_reads_the_dynamic_overrides_as_rayquant_wrote_them(tmp_path):
    """transformers' GPTQ path ignores `dynamic`, so the reference is rayquant's own per-layer reading."""
    require_vllm()
    out = tmp_path / "llama-tiny-overrides"
    proc = run_cli("quantize", str(SPEC), "--set", f"output.uri={out}", "--set", "calibration.eval_samples=0",
                   "--set", f"quant.overrides={OVERRIDES}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    source = open_model_source("synthetic://llama-tiny").path
    prompts = load_calibration("builtin://text", source, N_PROMPTS, PROMPT_LEN, N_PROMPTS, 0).eval_samples.tolist()
    # a skipped o_proj without qweight or a down_proj with 4 scale rows would not even load if vLLM
    # applied the base config; the logprobs then show it computes the same model
    completions = run_vllm(out, prompts, tmp_path)
    tolerance = bf16_tolerance(source, out, prompts, completions)
    agreement = compare(completions, path_logprobs(dequantized_model(source, out), prompts, completions), tolerance)
    print(agreement)
    assert agreement.max_logprob_diff <= tolerance, agreement
    assert agreement.max_tie_gap <= tolerance, agreement

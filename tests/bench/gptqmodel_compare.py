"""rayquant vs GPTQModel on the same tiny model and the same calibration windows, two evaluators.

    python -m tests.bench.gptqmodel_compare [--random-init] [--samples 32 --seq-len 256 --eval-samples 8]

Both tools quantize the tiny Llama (after a short training run, tests/e2e/trained_model.py; with
--random-init the raw synthetic://llama-tiny, whose perplexity deltas are noise) to 4-bit g128, sym,
no act-order, true_sequential, damp 0.01, on the windows `load_calibration` cuts for the job
(GPTQModel on CPU, in this process; rayquant through its CLI with 2 CPU workers on an embedded Ray).
Each checkpoint is then evaluated twice on the held-out windows: by `rayquant eval` (rayquant's own
reader, float32) and by the independent loader (transformers + optimum + GPTQModel's torch kernel).
Prints fp ppl, each tool's ppl and delta by each evaluator, an RTN row for scale, and wall times.
Needs the test extras (.ci/install-test-deps.sh): GPTQModel's quantize runs with them, nothing more.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from rayquant.jobs.cli import configure_logging
from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PackedLinear, dequantize_packed
from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import open_model_source
from rayquant.workers.checkpoint_eval import evaluate_perplexity
from rayquant.workers.evaluation import perplexity, window_nll

from tests.e2e.gptq_loader import load_gptq_logits
from tests.e2e.gptqmodel_quantize import quantize_with_gptqmodel
from tests.e2e.models import SPEC, fp_model, logits, rtn_model, run_cli
from tests.e2e.trained_model import trained_llama_tiny


def rayquant_eval(uri: Path, seq_len: int, eval_samples: int) -> dict:
    proc = run_cli("eval", str(uri), "--seq-len", str(seq_len), "--eval-samples", str(eval_samples))
    if proc.returncode != 0:
        raise RuntimeError(f"rayquant eval {uri} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def first_block_qkv_losses(source: Path, samples: torch.Tensor, checkpoint: Path) -> list[float]:
    """tr((W − Q) H (W − Q)ᵀ) of block 0's q/k/v with H from the fp model's inputs: the only layers
    whose inputs both tools share exactly, so their losses compare the solvers themselves."""
    model = fp_model(source)
    inputs = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=samples)
    hook.remove()
    X = torch.cat(inputs)  # [tokens, K]
    H = X.T @ X
    tensors = {}
    for shard in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(shard))
    losses = []
    for linear in ("q_proj", "k_proj", "v_proj"):
        name = f"model.layers.0.self_attn.{linear}"
        W = model.get_parameter(f"{name}.weight").double()
        packed = PackedLinear(**{f: tensors[f"{name}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")})
        E = W - dequantize_packed(packed, 4).double()
        losses.append(float(torch.trace(E @ H @ E.T)))
    return losses


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random-init", action="store_true", help="the untrained synthetic model")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=8)
    args = parser.parse_args()
    configure_logging(False)  # progress to stderr, the table alone on stdout

    source = open_model_source("synthetic://llama-tiny").path if args.random_init else trained_llama_tiny()
    calib = load_calibration("builtin://text", source, args.samples, args.seq_len, args.eval_samples, 0)
    ids = calib.eval_samples
    rows, walls, losses = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {"GPTQModel": Path(tmp) / "gptqmodel", "GPTQModel no GAR": Path(tmp) / "gptqmodel-no-gar",
                "rayquant": Path(tmp) / "rayquant"}
        walls["GPTQModel"] = quantize_with_gptqmodel(source, calib.samples, outs["GPTQModel"])
        walls["GPTQModel no GAR"] = quantize_with_gptqmodel(source, calib.samples, outs["GPTQModel no GAR"],
                                                            act_group_aware=False)

        start = time.perf_counter()
        proc = run_cli("quantize", str(SPEC), "--set", f"model.source={source}",
                       "--set", f"output.uri={outs['rayquant']}", "--set", f"calibration.n_samples={args.samples}",
                       "--set", f"calibration.seq_len={args.seq_len}",
                       "--set", f"calibration.eval_samples={args.eval_samples}")
        walls["rayquant"] = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"rayquant quantize failed:\n{proc.stderr[-3000:]}")
        report = json.loads((outs["rayquant"] / "report.json").read_text())
        if report["calibration_windows_sha256"] != calib.window_sha256:
            raise RuntimeError("rayquant's job cut other calibration windows than GPTQModel was given")

        fp_ours = rayquant_eval(source, args.seq_len, args.eval_samples)
        fp_loader = perplexity(*window_nll(logits(fp_model(source), ids), ids))
        for tool, out in outs.items():
            ours = rayquant_eval(out, args.seq_len, args.eval_samples)
            if ours["windows_sha256"] != fp_ours["windows_sha256"]:
                raise RuntimeError(f"{tool}: rayquant eval cut other eval windows than for the fp model")
            loader = perplexity(*window_nll(load_gptq_logits(out, ids, bits=4), ids))
            rows[tool] = (ours["ppl"], loader)
            losses[tool] = first_block_qkv_losses(source, calib.samples, out)
        rtn = evaluate_perplexity(rtn_model(source, GPTQConfig(bits=4, group_size=128, sym=True)), ids).ppl
        in_pass = report.get("eval", {})

    model = "synthetic://llama-tiny (random init)" if args.random_init else f"{source.name} (trained tiny Llama)"
    print(f"\n{model}; 4-bit g128 sym, calibration {args.samples} x {args.seq_len} tokens "
          f"(sha256 {calib.window_sha256[:12]}), eval {len(ids)} x {args.seq_len} (sha256 "
          f"{fp_ours['windows_sha256'][:12]}), {fp_ours['n_tokens']} predicted tokens")
    print(f"{'':18} {'rayquant eval':>14} {'delta':>9} {'indep. loader':>14} {'delta':>9} {'wall s':>8}")
    print(f"{'fp (bf16 weights)':18} {fp_ours['ppl']:14.4f} {'':9} {fp_loader:14.4f} {'':9} {'':>8}")
    for tool, (ours, loader) in rows.items():
        print(f"{tool:18} {ours:14.4f} {ours - fp_ours['ppl']:+9.4f} {loader:14.4f} {loader - fp_loader:+9.4f} "
              f"{walls[tool]:8.1f}")
    print(f"{'RTN (reference)':18} {rtn:14.4f} {rtn - fp_ours['ppl']:+9.4f}")
    if in_pass:
        print(f"rayquant in-pass eval (report.json): fp {in_pass['fp_ppl']:.4f}, gptq {in_pass['gptq_ppl']:.4f}")
    print("block 0 q/k/v layer loss tr((W-Q) H (W-Q)^T) on the shared fp inputs: " + "; ".join(
        f"{tool} " + "/".join(f"{x:.4g}" for x in values) for tool, values in losses.items()))
    print("GPTQModel 7.7.0 with its defaults (act_group_aware=True) and with act_group_aware=False (the "
          "paper's column order, as rayquant's desc_act=false)")
    for other in ("GPTQModel", "GPTQModel no GAR"):
        better = rows["rayquant"][0] <= rows[other][0]
        print(f"rayquant's delta is {'no worse than' if better else 'WORSE than'} {other}'s (rayquant eval)")


if __name__ == "__main__":
    main()

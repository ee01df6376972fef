"""rayquant vs GPTQModel on the same tiny model and the same calibration windows, over several seeds.

    python -m tests.bench.gptqmodel_compare [--seeds 0,1,2,3,4] [--random-init]
        [--samples 32 --seq-len 256 --eval-samples 8]

Three quantizers run on the tiny Llama (after a short training run, tests/e2e/trained_model.py; with
--random-init the raw synthetic://llama-tiny, whose perplexity deltas are noise): rayquant and
GPTQModel 7.7.0 (CPU, in this process) with its default act_group_aware=True and with False (the
paper's column order, as rayquant's desc_act=false). All: 4-bit g128, sym, no act-order,
true_sequential, damp 0.01. Per seed, all three get the same calibration windows, the ones
`load_calibration` cuts for a job with `calibration.seed` = that seed; the held-out eval windows do
not depend on the seed, so every checkpoint of every seed is scored on the same windows.

rayquant runs in this process through `jobs.driver.run_job` (the CLI's own call) inside one embedded
Ray session: run_job leaves a Ray it did not start running, so Ray starts once, not per job.
Each checkpoint is scored by `rayquant eval`'s in-process reader (float32 dequantized) and by the
independent loader (transformers + optimum + GPTQModel's torch kernel); their disagreement is printed.
The tables go to stdout, every log (GPTQModel's too) to stderr.

A single seed's deltas reorder with the calibration data (differences of ~0.05 ppl between
equivalent solvers are usual at 32 × 256), so the verdict rests on the paired difference
rayquant − other over seeds: its mean, standard error and a 95 % t interval. Needs the test extras
(.ci/install-test-deps.sh): GPTQModel's quantize runs with them, nothing more.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rayquant.jobs.logs import configure_logging
from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PackedLinear, dequantize_packed
from rayquant.storage.calibration import load_calibration
from rayquant.storage.gptq_checkpoint import open_gptq_checkpoint
from rayquant.storage.model_source import open_model_source
from rayquant.workers.checkpoint_eval import evaluate_perplexity, load_dequantized_model
from rayquant.workers.evaluation import perplexity, window_nll
from safetensors.torch import load_file

from tests.e2e.gptq_loader import load_gptq_logits
from tests.e2e.gptqmodel_quantize import quantize_with_gptqmodel
from tests.e2e.models import SPEC, fp_model, logits, rtn_model
from tests.e2e.trained_model import trained_llama_tiny

TOOLS = ("rayquant", "GPTQModel", "GPTQModel no GAR")
QKV = ("q_proj", "k_proj", "v_proj")


@dataclass
class SeedRun:
    seed: int
    calib_sha256: str
    ppl: dict[str, float] = field(default_factory=dict)  # tool -> rayquant eval's perplexity
    loader_ppl: dict[str, float] = field(default_factory=dict)  # tool -> the independent loader's
    in_pass_ppl: float = math.nan  # rayquant's report.json eval.gptq_ppl
    walls: dict[str, float] = field(default_factory=dict)
    qkv_losses: dict[str, list[float]] = field(default_factory=dict)


def rayquant_eval(path: Path, ids: torch.Tensor) -> float:
    """`rayquant eval`'s perplexity, in process: the checkpoint's dequantized float32 model."""
    return evaluate_perplexity(load_dequantized_model(open_gptq_checkpoint(str(path))), ids).ppl


def first_block_qkv_hessian(source: Path, samples: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Block 0's fp q/k/v weights and H = XᵀX of their inputs: the only layers whose inputs both
    tools share exactly, so tr((W − Q) H (W − Q)ᵀ) there compares the solvers themselves."""
    model = fp_model(source)
    inputs = []
    hook = model.model.layers[0].self_attn.q_proj.register_forward_pre_hook(
        lambda _mod, args: inputs.append(args[0].reshape(-1, args[0].shape[-1]).double()))
    with torch.no_grad():
        model(input_ids=samples)
    hook.remove()
    X = torch.cat(inputs)  # [tokens, K]
    weights = {name: model.get_parameter(f"model.layers.0.self_attn.{name}.weight").double() for name in QKV}
    return weights, X.T @ X


def qkv_losses(weights: dict[str, torch.Tensor], H: torch.Tensor, checkpoint: Path) -> list[float]:
    tensors = {}
    for shard in checkpoint.glob("*.safetensors"):
        tensors.update(load_file(shard))
    losses = []
    for linear in QKV:
        name = f"model.layers.0.self_attn.{linear}"
        packed = PackedLinear(**{f: tensors[f"{name}.{f}"] for f in ("qweight", "qzeros", "scales", "g_idx")})
        E = weights[linear] - dequantize_packed(packed, 4).double()
        losses.append(float(torch.trace(E @ H @ E.T)))
    return losses


def quantize_with_rayquant(source: Path, out: Path, args: argparse.Namespace, seed: int) -> dict:
    """One rayquant job on the already running Ray; returns its report.json."""
    from rayquant.jobs.driver import run_job
    from rayquant.jobs.spec import load_spec

    spec = load_spec(SPEC, [f"model.source={source}", f"output.uri={out}", f"calibration.n_samples={args.samples}",
                            f"calibration.seq_len={args.seq_len}", f"calibration.eval_samples={args.eval_samples}",
                            f"calibration.seed={seed}", f"quant.act_group_aware={not args.rayquant_no_gar}"])
    run_job(spec)
    return json.loads((out / "report.json").read_text())


def run_seed(source: Path, args: argparse.Namespace, seed: int, eval_ids: torch.Tensor) -> SeedRun:
    calib = load_calibration("builtin://text", source, args.samples, args.seq_len, args.eval_samples, seed)
    if not torch.equal(calib.eval_samples, eval_ids):
        raise RuntimeError(f"seed {seed}: load_calibration cut other eval windows than for seed {args.seeds[0]}")
    run = SeedRun(seed, calib.window_sha256)
    weights, H = first_block_qkv_hessian(source, calib.samples)
    with tempfile.TemporaryDirectory() as tmp:
        outs = {tool: Path(tmp) / tool.replace(" ", "-") for tool in TOOLS}
        start = time.perf_counter()
        report = quantize_with_rayquant(source, outs["rayquant"], args, seed)
        run.walls["rayquant"] = time.perf_counter() - start
        if report["calibration_windows_sha256"] != calib.window_sha256:
            raise RuntimeError(f"seed {seed}: rayquant's job cut other calibration windows than GPTQModel is given")
        run.in_pass_ppl = report["eval"]["gptq_ppl"]
        run.walls["GPTQModel"] = quantize_with_gptqmodel(source, calib.samples, outs["GPTQModel"])
        run.walls["GPTQModel no GAR"] = quantize_with_gptqmodel(source, calib.samples, outs["GPTQModel no GAR"],
                                                                act_group_aware=False)
        for tool, out in outs.items():
            run.ppl[tool] = rayquant_eval(out, eval_ids)
            run.loader_ppl[tool] = perplexity(*window_nll(load_gptq_logits(out, eval_ids, bits=4), eval_ids))
            run.qkv_losses[tool] = qkv_losses(weights, H, out)
    return run


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile (p > 0.5) from its density integrated on a fine grid (no scipy needed)."""
    x = torch.linspace(0, 200, 2_000_001, dtype=torch.float64)
    pdf = torch.distributions.StudentT(df).log_prob(x).exp()
    cdf = 0.5 + torch.cumulative_trapezoid(pdf, x)
    return float(x[1:][torch.searchsorted(cdf, p)])


def paired_verdict(diffs: list[float]) -> str:
    """rayquant − other per seed → mean ± standard error, 95 % t interval, and what it rules out."""
    n, mean = len(diffs), statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    lo, hi = mean - half, mean + half
    if lo > 0:
        verdict = f"rayquant WORSE beyond noise, by {mean:+.4f} ppl (at least {lo:+.4f})"
    elif hi < 0:
        verdict = f"rayquant better beyond noise, by {-mean:.4f} ppl"
    else:
        verdict = f"no difference beyond noise: rayquant is at most {hi:+.4f} ppl worse"
    return f"{mean:+9.4f} ± {se:.4f}  95% CI [{lo:+.4f}, {hi:+.4f}]  {verdict}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--random-init", action="store_true", help="the untrained synthetic model")
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated calibration seeds")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=8)
    parser.add_argument("--rayquant-no-gar", action="store_true",
                        help="rayquant in the paper's column order (quant.act_group_aware=false) instead of its default GAR")
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    configure_logging(False)  # progress to stderr, the tables alone on stdout
    from rayquant.jobs.cluster import connect, disconnect
    from rayquant.jobs.spec import ClusterSpec

    source = open_model_source("synthetic://llama-tiny").path if args.random_init else trained_llama_tiny()
    eval_ids = load_calibration("builtin://text", source, 1, args.seq_len, args.eval_samples, args.seeds[0]).eval_samples
    fp = rayquant_eval(source, eval_ids)
    fp_loader = perplexity(*window_nll(logits(fp_model(source), eval_ids), eval_ids))
    rtn = evaluate_perplexity(rtn_model(source, GPTQConfig(bits=4, group_size=128, sym=True)), eval_ids).ppl

    start = time.perf_counter()
    # the spec's 2 workers × 1 CPU, as run_job's own embedded Ray (on loopback)
    cluster = connect(ClusterSpec(num_workers=2, cpus_per_worker=1), verbose=False)
    ray_start = time.perf_counter() - start
    try:
        with contextlib.redirect_stdout(sys.stderr):  # GPTQModel's logbar prints to sys.stdout as it is then
            runs = [run_seed(source, args, seed, eval_ids) for seed in args.seeds]
    finally:
        disconnect(cluster)

    model = "synthetic://llama-tiny (random init)" if args.random_init else f"{source.name} (trained tiny Llama)"
    order = "paper column order" if args.rayquant_no_gar else "group-aware act-order (GAR, its default)"
    print(f"\nrayquant: {order}")
    print(f"{model}; 4-bit g128 sym, damp 0.01, calibration {args.samples} x {args.seq_len} tokens per seed, "
          f"eval {len(eval_ids)} x {args.seq_len} held-out windows, the same for every seed")
    print(f"fp (bf16 weights) ppl {fp:.4f} (independent loader {fp_loader:.4f}); RTN {rtn:.4f} ({rtn - fp:+.4f})")
    print("\nppl delta vs fp, rayquant eval:")
    print(f"{'seed':>4} {'calib sha256':>13} " + " ".join(f"{tool:>16}" for tool in TOOLS))
    for run in runs:
        print(f"{run.seed:4d} {run.calib_sha256[:12]:>13} " + " ".join(f"{run.ppl[t] - fp:+16.4f}" for t in TOOLS))
    if len(runs) > 1:
        print(f"{'mean ± std':>18} " + " ".join(
            f"{statistics.mean(d):+9.4f} ± {statistics.stdev(d):.4f}".rjust(16)
            for d in ([run.ppl[t] - fp for run in runs] for t in TOOLS)))
        print(f"\npaired difference of deltas over {len(runs)} seeds, rayquant − other (mean ± std error):")
        for other in TOOLS[1:]:
            print(f"  vs {other:17} {paired_verdict([run.ppl['rayquant'] - run.ppl[other] for run in runs])}")
    else:
        for other in TOOLS[1:]:
            better = runs[0].ppl["rayquant"] <= runs[0].ppl[other]
            print(f"rayquant's delta is {'no worse than' if better else 'WORSE than'} {other}'s on this one seed "
                  "(noise-dominated: give several --seeds)")

    loader_gap = max(abs(run.ppl[t] - run.loader_ppl[t]) for run in runs for t in TOOLS)
    in_pass_gap = max(abs(run.ppl["rayquant"] - run.in_pass_ppl) for run in runs)
    print(f"\nevaluators: rayquant eval vs independent loader max |ppl diff| {loader_gap:.2g} (fp {abs(fp - fp_loader):.2g}); "
          f"vs rayquant's in-pass eval {in_pass_gap:.2g}")
    ratios = [a / b for run in runs for a, b in zip(run.qkv_losses["rayquant"], run.qkv_losses["GPTQModel no GAR"])]
    print(f"block 0 q/k/v layer loss on the shared fp inputs, rayquant / GPTQModel no GAR: {min(ratios):.4f} .. "
          f"{max(ratios):.4f} over {len(runs)} seeds x 3 layers")
    print(f"wall s: Ray start {ray_start:.1f} once; per seed (mean) " + ", ".join(
        f"{t} {statistics.mean(run.walls[t] for run in runs):.1f}" for t in TOOLS)
        + " (rayquant: a job with 2 CPU workers, Ray already up)")


if __name__ == "__main__":
    main()

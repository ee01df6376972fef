"""quant.moe.hessian_tokens: `all` vs `routed` on the same trained tiny MoE and calibration windows, over seeds.

    python -m tests.bench.moe_hessian_tokens [--seeds 0,1,2,3,4] [--samples 32 --seq-len 256 --eval-samples 8]

The model is synthetic://qwen3-moe-tiny (8 experts, top-2, 4 blocks) after a short training run on the
shipped text with the router's load-balancing loss on (tests/e2e/trained_model.py); a random-init model's
perplexity deltas are noise. Per seed, both settings quantize the same calibration windows (the ones
`load_calibration` cuts for `calibration.seed` = that seed), 4-bit g128 sym, true_sequential, damp 0.01
(tiny-llama.yaml); the held-out eval windows do not depend on the seed, so every checkpoint is scored
on the same windows by `rayquant eval`'s reader (tests/bench/gptqmodel_compare.rayquant_eval).

The jobs run in this process through `jobs.driver.run_job` inside one embedded Ray session (2 CPU
workers, as the spec). The verdict rests on the paired difference routed − all over seeds: its mean,
standard error and 95 % t interval. Tables to stdout, logs to stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rayquant.jobs.logs import configure_logging
from rayquant.storage.calibration import load_calibration

from tests.bench.gptqmodel_compare import rayquant_eval, t_quantile
from tests.e2e.models import SPEC
from tests.e2e.trained_model import trained_moe_tiny

SETTINGS = ("all", "routed")


@dataclass
class SeedRun:
    seed: int
    calib_sha256: str
    ppl: dict[str, float] = field(default_factory=dict)  # setting -> rayquant eval's perplexity
    walls: dict[str, float] = field(default_factory=dict)  # setting -> the job's seconds
    collect: dict[str, float] = field(default_factory=dict)  # setting -> collect seconds summed over blocks
    rtn_ppl: float = math.nan  # the job's in-pass RTN stream
    min_routed: int = 0  # fewest calibration tokens the router sent one expert linear


def quantize(source: Path, out: Path, args: argparse.Namespace, seed: int, hessian_tokens: str) -> dict:
    """One rayquant job on the already running Ray; returns its report.json."""
    from rayquant.jobs.driver import run_job
    from rayquant.jobs.spec import load_spec

    spec = load_spec(SPEC, [f"model.source={source}", f"output.uri={out}", f"calibration.n_samples={args.samples}",
                            f"calibration.seq_len={args.seq_len}", f"calibration.eval_samples={args.eval_samples}",
                            f"calibration.seed={seed}", "calibration.eval_rtn=true",
                            f"quant.moe.hessian_tokens={hessian_tokens}"])
    run_job(spec)
    return json.loads((out / "report.json").read_text())


def run_seed(source: Path, args: argparse.Namespace, seed: int, eval_ids) -> SeedRun:
    calib = load_calibration("builtin://text", source, args.samples, args.seq_len, args.eval_samples, seed)
    run = SeedRun(seed, calib.window_sha256)
    with tempfile.TemporaryDirectory() as tmp:
        for setting in SETTINGS:
            out = Path(tmp) / setting
            start = time.perf_counter()
            report = quantize(source, out, args, seed, setting)
            run.walls[setting] = time.perf_counter() - start
            if report["calibration_windows_sha256"] != calib.window_sha256:
                raise RuntimeError(f"seed {seed}: the {setting} job cut other calibration windows")
            stats = json.loads((out / "run-stats.json").read_text())
            run.collect[setting] = sum(block["seconds"].get("collect", 0.0) for block in stats["blocks"])
            run.rtn_ppl = report["eval"]["rtn_ppl"]
            run.min_routed = min(x["routed_tokens"] for x in report["layers"] if x["routed_tokens"] is not None)
            run.ppl[setting] = rayquant_eval(out, eval_ids)
    return run


def interval(diffs: list[float]) -> tuple[float, float, float, float]:
    """mean, standard error and the 95 % t interval of paired differences."""
    n, mean = len(diffs), statistics.mean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    half = t_quantile(0.975, n - 1) * se
    return mean, se, mean - half, mean + half


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", default="0,1,2,3,4", help="comma-separated calibration seeds")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-samples", type=int, default=8)
    args = parser.parse_args()
    args.seeds = [int(s) for s in args.seeds.split(",")]
    configure_logging(False)  # progress to stderr, the tables alone on stdout
    from rayquant.jobs.cluster import connect, disconnect
    from rayquant.jobs.spec import ClusterSpec

    source = trained_moe_tiny()
    eval_ids = load_calibration("builtin://text", source, 1, args.seq_len, args.eval_samples, args.seeds[0]).eval_samples
    fp = rayquant_eval(source, eval_ids)
    start = time.perf_counter()
    cluster = connect(ClusterSpec(num_workers=2, cpus_per_worker=1), verbose=False)  # the spec's 2 workers
    ray_start = time.perf_counter() - start
    try:
        runs = [run_seed(source, args, seed, eval_ids) for seed in args.seeds]
    finally:
        disconnect(cluster)

    print(f"\n{source.name} (trained tiny Qwen3-MoE, 8 experts top-2); 4-bit g128 sym, damp 0.01, calibration "
          f"{args.samples} x {args.seq_len} tokens per seed, eval {len(eval_ids)} x {args.seq_len} held-out windows")
    print(f"fp ppl {fp:.4f}; RTN (in-pass) {statistics.mean(r.rtn_ppl for r in runs) - fp:+.4f}")
    print("\nppl delta vs fp, rayquant eval:")
    print(f"{'seed':>4} {'calib sha256':>13} {'all':>10} {'routed':>10} {'routed-all':>11} {'min routed':>11}")
    for r in runs:
        print(f"{r.seed:4d} {r.calib_sha256[:12]:>13} {r.ppl['all'] - fp:+10.4f} {r.ppl['routed'] - fp:+10.4f} "
              f"{r.ppl['routed'] - r.ppl['all']:+11.4f} {r.min_routed:11d}")
    if len(runs) > 1:
        print(f"{'mean ± std':>18} " + " ".join(
            f"{statistics.mean(d):+.4f}±{statistics.stdev(d):.4f}" for d in
            ([r.ppl[s] - fp for r in runs] for s in SETTINGS)))
        mean, se, lo, hi = interval([r.ppl["routed"] - r.ppl["all"] for r in runs])
        verdict = ("routed better beyond noise" if hi < 0 else "routed WORSE beyond noise" if lo > 0
                   else "no difference beyond noise")
        print(f"\npaired difference routed − all over {len(runs)} seeds: {mean:+.4f} ± {se:.4f} (std error), "
              f"95% CI [{lo:+.4f}, {hi:+.4f}]: {verdict}")
    print(f"wall s: Ray start {ray_start:.1f} once; per job (mean) " + ", ".join(
        f"{s} {statistics.mean(r.walls[s] for r in runs):.1f} (collect {statistics.mean(r.collect[s] for r in runs):.1f})"
        for s in SETTINGS))


if __name__ == "__main__":
    main()

"""Quality on real weights: Gemma-3-270M quantized by rayquant, fp vs RTN vs GPTQ held-out perplexity.

    python -m tests.bench.gemma3_quality [--bits 4,8] [--samples 64] [--seq-len 256] [--eval 32]

Each configuration is one `rayquant quantize` run through the CLI (embedded Ray, 2 CPU workers,
builtin://text); the perplexities are the job's own in-pass evaluation (report.json "eval": the
held-out windows flowed through the fp, GPTQ and RTN models in the same block loop, see
workers/evaluation.py). The source is the GGUF package's Q4_K_M weights dequantized to bf16
(tests/bench/real_models.py), so "fp" means "the model as shipped" and RTN/GPTQ quantize it again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.bench.real_models import gemma3_270m_dir

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "specs" / "tiny-llama.yaml"


def quantize(source: Path, out: Path, bits: int, group_size: int, samples: int, seq_len: int, n_eval: int,
             workers: int) -> dict:
    """Run the CLI once; the report's eval section plus the wall seconds."""
    settings = {"name": f"gemma3-270m-w{bits}g{group_size}", "model.source": str(source), "output.uri": str(out),
                "quant.bits": bits, "quant.group_size": group_size, "calibration.n_samples": samples,
                "calibration.seq_len": seq_len, "calibration.eval_samples": n_eval, "calibration.eval_rtn": "true",
                "cluster.num_workers": workers}
    args = [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC), *args],
                          capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"rayquant quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    evaluation = json.loads((out / "report.json").read_text())["eval"]
    return {**evaluation, "bits": bits, "group_size": group_size, "seconds": round(time.perf_counter() - start, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4,8", help="comma-separated bit widths, one job each")
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per calibration and eval window")
    parser.add_argument("--eval", type=int, default=32, help="held-out windows (builtin://text's tail holds ~12.7k tokens)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=Path(os.environ.get("RAYQUANT_TEST_CACHE") or
                                                            Path.home() / ".cache" / "rayquant"))
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    source = gemma3_270m_dir(args.cache)
    rows = []
    with tempfile.TemporaryDirectory(prefix="gemma3-quality-") as tmp:
        for bits in (int(b) for b in args.bits.split(",")):
            rows.append(quantize(source, Path(tmp) / f"w{bits}", bits, args.group_size, args.samples, args.seq_len,
                                 args.eval, args.workers))
            row = rows[-1]
            print(f"w{bits}g{args.group_size}: fp {row['fp_ppl']:.2f}  RTN {row['rtn_ppl']:.2f}  "
                  f"GPTQ {row['gptq_ppl']:.2f}  ({row['n_windows']} x {row['seq_len']} held-out tokens, "
                  f"{args.samples} x {args.seq_len} calibration, {row['seconds']} s)", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()

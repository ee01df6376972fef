"""Where the quick-start job's wall time goes: `rayquant quantize` as a user runs it, split by its own logs.

    python -m tests.bench.startup_bench [--runs 3] [--spec jobs/specs/tiny-llama.yaml] [--set key=value ...]

Each run is the real CLI in a fresh process (embedded Ray, real files, a new output directory; the
synthetic model cache is warm after the first run, as it is for a user's second job). stderr is a
pipe, so the CLI writes JSON log lines; their timestamps split the wall time:

  cli        process start -> `job_starting` (Python, the CLI's imports, the spec)
  ray        Ray's own start (`workers_ready.ray_seconds`); the driver's torch/transformers imports
             run on another thread meanwhile
  preflight  `job_starting` -> `calibration_records`: Ray, the driver's imports, the model source and
             the output state, the calibration windows (the workers start during the windows)
  workers    -> `workers_ready`: the actors' processes import and build their shard
  blocks     -> the last `block_done`
  tail       -> `job_done`: evaluation, assembly, manifest
  exit       -> the process exits (Ray's shutdown)

and, measured alone beside it, `import rayquant.jobs.driver` in a fresh interpreter (torch,
transformers, Ray: the imports that the job overlaps with Ray's start).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PHASES = ("cli", "ray", "preflight", "workers", "blocks", "tail", "exit", "wall")


def _seconds(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def run_once(spec: Path, sets: list[str], out: Path) -> dict[str, float]:
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(spec), *(a for s in sets for a in ("--set", s)),
           "--set", f"output.uri={out}"]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=900)
    t_exit = time.time()
    if proc.returncode != 0:
        sys.exit(f"rayquant quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    first = {}
    for e in events:
        first.setdefault(e["event"], e)
    blocks = [e for e in events if e["event"] == "block_done"]
    t = {name: _seconds(first[name]) for name in ("job_starting", "calibration_records", "workers_ready", "job_done")}
    return {
        "cli": t["job_starting"] - t0,
        "ray": first["workers_ready"]["ray_seconds"],
        "preflight": t["calibration_records"] - t["job_starting"],
        "workers": t["workers_ready"] - t["calibration_records"],
        "blocks": _seconds(blocks[-1]) - t["workers_ready"],
        "tail": t["job_done"] - _seconds(blocks[-1]),
        "exit": t_exit - t["job_done"],
        "wall": t_exit - t0,
        "block_compute": sum(e["seconds"] for e in blocks),
    }


def driver_import_seconds() -> float:
    code = "import time; t = time.perf_counter(); import rayquant.jobs.driver; print(time.perf_counter() - t)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return float(out.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--spec", type=Path, default=REPO / "jobs" / "specs" / "tiny-llama.yaml")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.runs):
            rows.append(run_once(args.spec, args.set, Path(tmp) / f"run{i}"))
    print(f"rayquant quantize {args.spec.name} {' '.join(args.set)}: {args.runs} runs, seconds")
    print("run  " + " ".join(f"{p:>9}" for p in PHASES) + "  block compute")
    for i, row in enumerate(rows):
        print(f"{i:>3}  " + " ".join(f"{row[p]:9.2f}" for p in PHASES) + f"  {row['block_compute']:13.2f}")
    print("med  " + " ".join(f"{statistics.median(r[p] for r in rows):9.2f}" for p in PHASES)
          + f"  {statistics.median(r['block_compute'] for r in rows):13.2f}")
    imports = statistics.median(driver_import_seconds() for _ in range(args.runs))
    print(f"driver imports alone (torch, transformers, ray; overlapped with Ray in the job): {imports:.2f} s")


if __name__ == "__main__":
    main()

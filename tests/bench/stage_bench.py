"""Per-block stage seconds of the tiny model with 1 and 2 CPU workers, measured in one run.

    python tests/bench/stage_bench.py [--set key.path=value ...]

Prints one table per worker count (every stage of driver.STAGES for every block; persist runs behind
the next block and is in run-stats.json), and the bytes that crossed between workers in load / reduce / share)
and the total wall time of each job. `--workers 1,2,4` checks the communication model.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rayquant.jobs.logs import configure_logging
from rayquant.jobs.driver import STAGES, run_job
from rayquant.jobs.spec import load_spec

SPEC = Path(__file__).resolve().parents[2] / "jobs" / "specs" / "tiny-llama.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--workers", default="1,2")
    args = parser.parse_args()
    configure_logging(False)
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for w in [int(x) for x in args.workers.split(",")]:
            spec = load_spec(SPEC, [*args.set, f"cluster.num_workers={w}", f"output.uri={tmp}/w{w}"])
            t = time.perf_counter()
            outcome = run_job(spec)
            rows.append((w, time.perf_counter() - t, outcome.block_stats))
    for w, wall, blocks in rows:
        print(f"\nworkers={w}  job wall {wall:.1f} s")
        print("block " + " ".join(f"{s:>9}" for s in STAGES) + "   KiB moved: load reduce share")
        for stats in blocks:
            kib = " ".join(f"{sum(r.get(k, 0) for r in stats.bytes_received) / 1024:8.0f}"
                           for k in ("load", "reduce", "share"))  # received by all ranks
            print(f"{stats.block:>5} " + " ".join(f"{stats.seconds.get(s, 0.0):9.3f}" for s in STAGES) + f"   {kib}")
        print("total " + " ".join(f"{sum(x.seconds.get(s, 0.0) for x in blocks):9.3f}" for s in STAGES))


if __name__ == "__main__":
    main()

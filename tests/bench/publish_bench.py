"""A job published to S3 while it runs: the tail after the last block against the whole upload.

A seeded Llama (hidden 1024, MLP 2816, 8 blocks; ~25 MB of bf16 weights per block) is quantized through
`rayquant quantize` on the embedded Ray twice in one run: into a local directory, and into s3:// on a
real S3 server (SeaweedFS `weed mini` on 127.0.0.1) with shards of about two blocks, so shards upload
while later blocks compute. Prints both jobs' wall time and, for the S3 job, the seconds spent uploading
(every file) beside the publishing tail (what was left to upload once the local manifest was written).

    python -m tests.bench.publish_bench [--work-dir DIR] [--blocks N]
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

from tests.bench.s3_load_bench import write_model
from tests.s3_server import run_s3_server

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "specs" / "tiny-llama.yaml"


def quantize(model: Path, out: str, env: dict, shard_bytes: int) -> tuple[float, list[dict]]:
    sets = [f"model.source={model}", f"output.uri={out}", f"output.max_shard_bytes={shard_bytes}",
            "calibration.eval_samples=0"]
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC),
                           *(a for s in sets for a in ("--set", s))], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=1800)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"rayquant quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return wall, [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--blocks", type=int, default=8)
    args = parser.parse_args()
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="publish-bench-"))
    model = write_model(work / "model", hidden=1024, mlp=2816, heads=8, kv_heads=8, blocks=args.blocks)
    with run_s3_server(work / "s3") as server:
        server.create_bucket("bench")
        env = {**os.environ, **server.env(), "RAYQUANT_CACHE": str(work / "cache")}
        shard_bytes = 14 * 2**20
        local_wall, _ = quantize(model, str(work / "local-out"), env, shard_bytes)
        s3_wall, events = quantize(model, "s3://bench/out", env, shard_bytes)
    published = next(e for e in events if e["event"] == "output_published")
    planned = next(e for e in events if e["event"] == "job_planned")
    print(f"model: {args.blocks} blocks, output {planned['output_bytes'] / 2**20:.1f} MiB in {planned['shards']} shards")
    print(f"{'job':<10} {'wall s':>8}")
    print(f"{'local':<10} {local_wall:>8.1f}")
    print(f"{'s3':<10} {s3_wall:>8.1f}")
    print(f"s3 upload, every file: {published['upload_seconds']:.2f} s; publishing tail after the manifest was "
          f"written: {published['tail_seconds']:.2f} s")


if __name__ == "__main__":
    main()

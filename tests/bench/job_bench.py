"""The whole job at a real shape through `rayquant quantize`: start-up, each block, tail, projection.

    python -m tests.bench.job_bench --preset llama-70b --blocks 4 [--samples 128 --seq-len 2048 --eval-samples 16]
    python -m tests.bench.job_bench --preset qwen3-30b-a3b --on-read [--json run.json]
    python -m tests.bench.job_bench --preset llama-8b --on-read --standing-ray
    python -m tests.bench.job_bench --preset llama-8b --blocks 1 --samples 2 --seq-len 64 --eval-samples 0  # CPU

The CLI runs in a fresh process as a user runs it (embedded Ray, one GPU per worker when CUDA is
there, else CPU workers), 4-bit g128 with the spec's defaults (act_group_aware), on builtin://text.
The model is a generated shape (storage/generated.py): with `--blocks N` its first N blocks are
written as real safetensors shards into --work-dir first (kept for the next run), so loading from
disk is measured (from the page cache: the files were just written); with `--on-read`, the job reads
synthetic://<preset>, every block, its weights drawn on the worker's device.

stderr is a pipe, so the CLI writes JSON log lines; from them it prints start-up (command start ->
`workers_ready`, -> block 0 starts), each block's wall against the sum of its stages' seconds (the
slowest rank's, as `block_done` gives them), the tail (last `block_done` -> process exit: evaluation,
assembly, Ray's shutdown), the output's size, and the full model projected as start-up + tail +
num_hidden_layers x the median block wall past block 0 (the tail's assembly grows with the model).
On CUDA, tests/bench/block_bench.py then runs the same blocks in-process on the same GPU (no Ray, no
files) and the ratio of the two block walls is the job's overhead per block; it needs CUDA, so on CPU
it is skipped with a note.

With `--standing-ray` the job runs as on a standing cluster: a Ray head (`ray start --head` on loopback,
token auth, no dashboard) is started before the command and stopped after it, and the job joins it
(cluster.address, output.shared): neither Ray's start nor its shutdown is in the job's time.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

import torch

from rayquant.storage.generated import GENERATED_PRESETS, write_generated_model
from tests.ray_head import run_ray_head

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "specs" / "tiny-llama.yaml"
EVENTS = ("job_starting", "driver_imported", "calibration_ready", "job_planned", "workers_ready", "block_done",
          "eval_done", "job_done")
START_EVENTS = EVENTS[:5]  # the start-up's milestones, printed as seconds from the command's start
IN_PROCESS_BLOCKS = 4  # block_bench runs blocks 0..3 at most: past warm-up, and DeepSeek-V3's first MoE block


@dataclass(frozen=True)
class BlockTiming:
    block_idx: int
    wall: float  # the driver's seconds from dispatch to the block's marker
    stages: dict[str, float]  # per stage, the slowest rank's seconds


@dataclass(frozen=True)
class JobTiming:
    start_up: dict[str, float]  # command start -> each of START_EVENTS
    to_workers_ready: float  # command start -> workers_ready
    to_first_block: float  # command start -> block 0 dispatched
    blocks: list[BlockTiming]
    tail: float  # last block_done -> process exit
    eval_seconds: float | None
    finish_seconds: float  # job_done's: shards closed, metadata and manifest written
    exit_seconds: float  # job_done -> process exit (Ray's shutdown)
    wall: float
    output_bytes: int


def prepare_model(preset: str, n_blocks: int, work_dir: Path, device: str) -> tuple[Path, float | None]:
    """The preset's first n_blocks as real shards under work_dir; seconds spent writing (None: reused)."""
    target = work_dir / f"{preset}-{n_blocks}blocks"
    config = target / "config.json"  # written last: its presence means the directory is whole
    if config.is_file() and json.loads(config.read_text())["num_hidden_layers"] == n_blocks:
        return target, None
    shutil.rmtree(target, ignore_errors=True)
    t = time.perf_counter()
    write_generated_model(preset, target, n_blocks=n_blocks, device=device)
    return target, time.perf_counter() - t


def run_job(source: str, out: Path, args: argparse.Namespace, gpu: bool, env: dict[str, str] | None = None) -> JobTiming:
    """`rayquant quantize` in a fresh process (`env` added to its environment); its JSON log lines timed
    against the command's start."""
    sets = {
        "name": f"bench-{args.preset}", "model.source": source, "output.uri": str(out),
        "quant.bits": 4, "quant.group_size": 128, "calibration.dataset": "builtin://text",
        "calibration.n_samples": args.samples, "calibration.seq_len": args.seq_len,
        "calibration.eval_samples": args.eval_samples, "cluster.num_workers": args.workers,
        "cluster.gpus_per_worker": int(gpu), "cluster.cpus_per_worker": args.cpus_per_worker,
    }
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC),
           *(a for k, v in sets.items() for a in ("--set", f"{k}={v}")), *(a for s in args.set for a in ("--set", s))]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | (env or {}))
    events, other = [], []
    log = args.log.open("w") if args.log else None
    for line in proc.stderr:  # echoed as it comes: a full-size job runs for hours
        if log is not None:
            log.write(line)
        event = json.loads(line) if line.startswith("{") else None
        if event is None or event["event"] not in EVENTS:
            other.append(line)
            continue
        events.append(event)
        detail = f"block {event['progress']}, {event['seconds']:.1f} s" if event["event"] == "block_done" else ""
        print(f"  {time.time() - t0:8.1f} s  {event['event']} {detail}", flush=True)
    proc.wait()
    if log is not None:
        log.close()
    t_exit = time.time()
    if proc.returncode != 0:
        sys.exit(f"rayquant quantize failed ({proc.returncode}):\n{''.join(other)[-3000:]}")

    first_of = {e["event"]: e for e in reversed(events)}
    done = [e for e in events if e["event"] == "block_done"]
    return JobTiming(
        start_up={e: round(_time(first_of[e]) - t0, 2) for e in START_EVENTS if e in first_of},
        to_workers_ready=_time(first_of["workers_ready"]) - t0,
        to_first_block=_time(done[0]) - done[0]["seconds"] - t0,
        blocks=[BlockTiming(i, e["seconds"], e["stages"]) for i, e in enumerate(done)],
        tail=t_exit - _time(done[-1]),
        eval_seconds=first_of["eval_done"]["seconds"] if "eval_done" in first_of else None,
        finish_seconds=first_of["job_done"]["finish_seconds"],
        exit_seconds=t_exit - _time(first_of["job_done"]),
        wall=t_exit - t0,
        output_bytes=sum(f.stat().st_size for f in out.rglob("*") if f.is_file()),
    )


def in_process_block_wall(args: argparse.Namespace, n_blocks: int) -> tuple[int, float]:
    """tests/bench/block_bench.py on blocks 0..n_blocks-1 of the preset: its reported block and that block's wall."""
    cmd = [sys.executable, "-m", "tests.bench.block_bench", "--preset", args.preset, "--samples", str(args.samples),
           "--seq-len", str(args.seq_len), "--eval-samples", str(args.eval_samples), "--blocks", str(n_blocks),
           "--no-baseline"]
    print(f"in-process: {' '.join(cmd[1:])}", flush=True)
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"block_bench failed ({out.returncode}):\n{out.stderr[-3000:]}")
    print("".join(line + "\n" for line in out.stdout.splitlines() if line.startswith(("stage ", "block "))), flush=True)
    block = re.search(r"reporting block (\d+)", out.stdout)
    wall = re.search(r"block wall ([\d.]+) s", out.stdout)
    if not (block and wall):
        sys.exit(f"block_bench printed no 'reporting block' / 'block wall' line:\n{out.stdout[-3000:]}")
    return int(block[1]), float(wall[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-8b", choices=sorted(GENERATED_PRESETS))
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--blocks", type=int, help="write the first N blocks to disk and quantize those")
    which.add_argument("--on-read", action="store_true", help="synthetic://<preset>: every block, drawn on read")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1, help="one GPU each on CUDA (block_bench uses one)")
    parser.add_argument("--cpus-per-worker", type=int, default=None, help="default: 4 on CUDA, every core on CPU")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more spec overrides")
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/rayquant-job-bench"))
    parser.add_argument("--json", type=Path, help="write every number here")
    parser.add_argument("--no-in-process", action="store_true", help="skip block_bench (a repeat on the same GPU)")
    parser.add_argument("--log", type=Path, help="keep the CLI's log lines (stderr) here")
    parser.add_argument("--standing-ray", action="store_true",
                        help="join a Ray head started before the command (a standing cluster) instead of embedded Ray")
    args = parser.parse_args()
    gpu = torch.cuda.is_available()
    args.cpus_per_worker = args.cpus_per_worker or (4 if gpu else max(1, torch.get_num_threads() // args.workers))
    args.work_dir.mkdir(parents=True, exist_ok=True)
    full_blocks = GENERATED_PRESETS[args.preset]["num_hidden_layers"]

    write_s = None
    if args.on_read:
        source = f"synthetic://{args.preset}"
    else:
        model_dir, write_s = prepare_model(args.preset, args.blocks, args.work_dir, "cuda" if gpu else "cpu")
        source = str(model_dir)
        print(f"model: {model_dir} ({_gib(model_dir):.1f} GiB; "
              + ("reused)" if write_s is None else f"written in {write_s:.1f} s)"), flush=True)
    out = args.work_dir / "output"
    shutil.rmtree(out, ignore_errors=True)
    if args.standing_ray:
        with run_ray_head(num_cpus=args.workers * args.cpus_per_worker, dashboard=False) as head:
            args.set += [f"cluster.address={head.gcs_address}", "output.shared=true"]
            job = run_job(source, out, args, gpu, env=head.env() | {"RAY_AUTH_MODE": "token"})
    else:
        job = run_job(source, out, args, gpu)
    walls = [b.wall for b in job.blocks]
    steady = statistics.median(walls[1:] if len(walls) > 1 else walls)
    projected = job.to_first_block + job.tail + full_blocks * steady

    in_process = None
    if gpu and not args.no_in_process:
        ref_block, ref_wall = in_process_block_wall(args, min(len(walls), IN_PROCESS_BLOCKS))
        in_process = {"block": ref_block, "wall": ref_wall, "cli_wall": walls[ref_block],
                      "ratio": walls[ref_block] / ref_wall}

    device = torch.cuda.get_device_name() if gpu else f"CPU ({torch.get_num_threads()} threads)"
    print(f"\n{args.preset} ({source}): {len(walls)} of {full_blocks} blocks, {args.samples} x {args.seq_len} tokens, "
          f"{args.eval_samples} eval windows, 4-bit g128, {args.workers} worker(s) x {args.cpus_per_worker} CPUs"
          f"{' + 1 GPU' if gpu else ''}, {device}, {'a standing Ray head' if args.standing_ray else 'embedded Ray'}")
    print(f"start-up: {job.to_workers_ready:.2f} s to workers_ready, {job.to_first_block:.2f} s to block 0 ("
          + ", ".join(f"{e} {t:.2f}" for e, t in job.start_up.items()) + ")")
    stages = list(job.blocks[0].stages)
    print("block      wall  stage sum  wall/sum  " + " ".join(f"{s:>8}" for s in stages))
    for b in job.blocks:
        total = sum(b.stages.values())
        print(f"{b.block_idx:>5} {b.wall:9.2f} {total:10.2f} {b.wall / total:9.3f}  "
              + " ".join(f"{b.stages.get(s, 0.0):8.2f}" for s in stages))
    eval_note = (f" (eval {job.eval_seconds:.2f} s, " if job.eval_seconds is not None else " (") + \
        f"finish {job.finish_seconds:.2f} s, exit after job_done {job.exit_seconds:.2f} s)"
    print(f"tail (last block_done -> exit): {job.tail:.2f} s{eval_note}; total wall {job.wall:.2f} s; "
          f"output {job.output_bytes / 2**30:.2f} GiB")
    which = "median block wall past block 0" if len(walls) > 1 else "block 0's wall: run --blocks 2 or more"
    print(f"projected {args.preset}: {job.to_first_block:.1f} s start-up + {job.tail:.1f} s tail + "
          f"{full_blocks} blocks x {steady:.2f} s ({which}) = {projected / 60:.1f} min")
    if in_process:
        print(f"block {in_process['block']}: CLI wall {in_process['cli_wall']:.2f} s / in-process (block_bench) "
              f"{in_process['wall']:.2f} s = {in_process['ratio']:.2f}")
    else:
        print("in-process block bench: skipped (tests/bench/block_bench.py runs on CUDA only)")
    if args.json:
        record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
                  "device": device, "source": source, "write_seconds": write_s, "job": asdict(job),
                  "steady_block_wall": steady, "full_blocks": full_blocks, "projected_seconds": projected,
                  "in_process": in_process}
        args.json.write_text(json.dumps(record, indent=2) + "\n")


def _time(event: dict) -> float:
    return datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def _gib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**30


if __name__ == "__main__":
    main()

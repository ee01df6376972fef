"""What a dead worker costs, and the two ways to restore its calibration shard, measured side by side.

    python -m tests.bench.recovery_bench --preset llama-8b --kill-block 16 [--samples 128 --seq-len 2048]
    python -m tests.bench.recovery_bench --preset llama-70b --blocks 10 --kill-block 8 --also llama-70b

1. Replay (what rayquant does): `rayquant quantize` on synthetic://<preset> (weights drawn on read; with
   --blocks N its first N blocks written to disk first, as tests/bench/job_bench.py does), rank 0
   SIGKILLed as it enters block --kill-block's collect (workers/failpoints.py). From the job's log lines:
   the replacement's start-up (workers_replaced → the first replayed block), each replayed block's seconds,
   the whole recovery (`recovered`), and the job's steady block wall for comparison.
2. Persist (the alternative): each rank's calibration shard at a block boundary — samples/W x seq_len x
   hidden activations in the worker's dtype, for the preset and for --also (default llama-70b) — copied to
   host, written and fsynced into --work-dir, then read back to the device: the seconds and bytes every
   block would pay (or overlap, holding that much disk and host memory) so that a failure replays nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from rayquant.storage.generated import GENERATED_PRESETS

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "specs" / "tiny-llama.yaml"


def run_with_a_death(args: argparse.Namespace, gpu: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="recovery-bench-", dir=args.work_dir))
    fired = out / "fired"
    fired.mkdir()
    source = f"synthetic://{args.preset}"
    if args.blocks:
        from tests.bench.job_bench import prepare_model

        source = str(prepare_model(args.preset, args.blocks, Path(args.work_dir), "cuda" if gpu else "cpu")[0])
    sets = {"name": f"recovery-{args.preset}", "model.source": source,
            "output.uri": str(out / "output"), "calibration.n_samples": args.samples,
            "calibration.seq_len": args.seq_len, "calibration.eval_samples": args.eval_samples,
            "cluster.num_workers": 1, "cluster.gpus_per_worker": int(gpu), "cluster.cpus_per_worker": 4 if gpu else 2}
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC),
           *(a for k, v in sets.items() for a in ("--set", f"{k}={v}"))]
    env = {**os.environ, "RAYQUANT_FAILPOINTS": f"0:{args.kill_block}:collect", "RAYQUANT_FAILPOINT_DIR": str(fired)}
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.exit(f"rayquant quantize failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    events = [json.loads(line) for line in proc.stderr.splitlines() if line.startswith("{")]
    (replaced,) = [e for e in events if e["event"] == "workers_replaced"]
    (recovered,) = [e for e in events if e["event"] == "recovered"]
    after = events[events.index(replaced):]
    replayed = [e["seconds"] for e in after if e["event"] == "block_done" and e["replayed"]]
    quantized = [e["seconds"] for e in events if e["event"] == "block_done" and not e["replayed"]]
    return {"wall": wall, "recovery": recovered["seconds"], "replayed_blocks": len(replayed),
            "replay_seconds": sum(replayed), "replay_per_block": statistics.median(replayed) if replayed else 0.0,
            "restart_seconds": recovered["seconds"] - sum(replayed), "steady_block": statistics.median(quantized[1:])}


def persist_shard(preset: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict:
    hidden = GENERATED_PRESETS[preset]["hidden_size"]
    shard = torch.randn(args.samples, args.seq_len, hidden, device=device, dtype=torch.float32).to(dtype)
    path = Path(args.work_dir) / f"shard-{preset}.bin"
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    host = shard.cpu()
    with path.open("wb") as f:
        f.write(host.view(torch.uint8).numpy())
        f.flush()
        os.fsync(f.fileno())
    written = time.perf_counter() - t
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # read back from the disk, not the page cache
    os.close(fd)
    t = time.perf_counter()
    back = torch.frombuffer(bytearray(path.read_bytes()), dtype=dtype).view_as(host).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    restored = time.perf_counter() - t
    assert torch.equal(back, shard)
    path.unlink()
    return {"preset": preset, "bytes": shard.numel() * shard.element_size(), "write_fsync_s": written,
            "restore_s": restored}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="llama-8b", choices=sorted(GENERATED_PRESETS))
    parser.add_argument("--also", default="llama-70b", choices=sorted(GENERATED_PRESETS))
    parser.add_argument("--kill-block", type=int, default=16)
    parser.add_argument("--blocks", type=int, help="write the first N blocks to disk and quantize those")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--eval-samples", type=int, default=16)
    parser.add_argument("--work-dir", default="/tmp/rayquant-recovery-bench")
    parser.add_argument("--skip-job", action="store_true", help="only the persist measurement")
    args = parser.parse_args()
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32  # the workers' activation dtype (workers/block_worker.py)
    name = torch.cuda.get_device_name() if gpu else "CPU"
    print(f"{name}; {args.samples} x {args.seq_len} calibration tokens on one worker")
    for preset in dict.fromkeys((args.preset, args.also)):
        p = persist_shard(preset, args, device, dtype)
        print(f"persist {preset}: {p['bytes'] / 2**30:.2f} GiB per block boundary; to host + write + fsync "
              f"{p['write_fsync_s']:.2f} s ({p['bytes'] / p['write_fsync_s'] / 2**30:.2f} GiB/s), restore "
              f"{p['restore_s']:.2f} s")
    if args.skip_job:
        return
    r = run_with_a_death(args, gpu)
    print(f"replay {args.preset}: rank 0 killed entering block {args.kill_block}'s collect; recovery {r['recovery']:.2f} s"
          f" = new workers' start-up {r['restart_seconds']:.2f} s + {r['replayed_blocks']} blocks replayed in "
          f"{r['replay_seconds']:.2f} s ({r['replay_per_block']:.3f} s per block; a quantized block takes "
          f"{r['steady_block']:.2f} s); job wall {r['wall']:.1f} s")


if __name__ == "__main__":
    main()

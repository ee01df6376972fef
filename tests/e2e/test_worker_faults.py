"""A worker killed inside the job costs its block, never the job: the CLI's tiny job (4 blocks, 2 workers,
real Ray) with workers SIGKILLed at seeded points (workers/failpoints.py) — start-up, every stage of a
block, the background write, the evaluation — ends with the bytes of an undisturbed run; a rank that dies
more often than cluster.max_worker_restarts ends the job in one line, and the rerun resumes; a rank out of
device memory ends it in one line naming the block, the stage and the fix, and the rerun resumes to the
same bytes.

The driver killed at any point (early, after a marker mid-write, with shards closing, SIGTERM) is
tests/e2e/test_quantize.py's and tests/jobs/test_cluster_start.py's: a rerun resumes to the same bytes."""

from __future__ import annotations

import os
from pathlib import Path

from .models import SPEC, log_events, output_files, run_cli

# rank:block:point (workers/failpoints.py), each fired once, in the order the job reaches them: start-up
# (join, embed), every stage of a block on one rank or the other, rank 0's background write (persist: the
# block's bytes half there; its marker not), the evaluation. Both ranks die 5 times: max_worker_restarts=5.
POINTS = ("1:-:join", "0:-:embed", "1:0:load", "0:0:collect", "1:1:reduce", "0:1:solve", "1:2:share",
          "0:2:advance", "0:2:persist", "1:-:evaluate")


def _run_with_failpoints(points: tuple[str, ...], out: Path, fired: Path, *sets: str):
    fired.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "RAYQUANT_FAILPOINTS": ",".join(points), "RAYQUANT_FAILPOINT_DIR": str(fired)}
    args = [a for s in (*sets, f"output.uri={out}") for a in ("--set", s)]
    return run_cli("quantize", str(SPEC), *args, env=env)


def test_workers_killed_at_ten_points_are_replaced_and_the_output_is_byte_identical(tmp_path, quantize_once):
    reference = quantize_once().output()  # the shipped spec, undisturbed
    out, fired = tmp_path / "out", tmp_path / "fired"
    proc = _run_with_failpoints(POINTS, out, fired, "cluster.max_worker_restarts=5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    # every point fired (a worker died there) and each death cost one replacement of the workers
    assert sorted(p.name for p in fired.iterdir()) == sorted(p.replace(":", "-") for p in POINTS)
    replaced = log_events(proc.stderr, "workers_replaced")
    assert [e["dead_rank"] for e in replaced] == [int(p.split(":")[0]) for p in POINTS]
    # the deaths at join and at embed come in consecutive start-ups: the third set recovers from both
    recovered = log_events(proc.stderr, "recovered")
    assert len(recovered) == len(POINTS) - 1
    print("\nrecovery (new workers' start-up + replay of the durable blocks) per death:",
          *(f"{p}: {e['seconds']} s, resumed at block {e['resume_from']}" for p, e in zip(POINTS[1:], recovered)),
          sep="\n")
    assert log_events(proc.stderr, "job_done")[0]["worker_restarts"] == len(POINTS)
    # stdout holds the output path only (Ray's post-mortem of a dead worker is a debug log line)
    assert proc.stdout.strip().splitlines() == [str(out.resolve())]
    assert not [line for line in proc.stderr.splitlines() if not line.startswith("{")], proc.stderr[-2000:]
    assert output_files(out) == output_files(reference)


def test_a_rank_dying_more_often_than_allowed_ends_the_job_in_one_line(tmp_path):
    out = tmp_path / "out"
    proc = _run_with_failpoints(("1:-:join",), out, tmp_path / "fired", "cluster.max_worker_restarts=0")
    assert proc.returncode == 1, proc.stderr[-3000:]
    plain = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith("error: WorkerDied: worker rank 1 died 1 times in this job, "
                                                   "more than cluster.max_worker_restarts=0"), plain
    assert "worker rank 1 died during start-up" in plain[0] and "Traceback" not in proc.stderr
    assert not (out / "rayquant-manifest.json").exists()


def test_a_rank_out_of_device_memory_ends_the_job_in_one_line_and_the_rerun_resumes(tmp_path, quantize_once):
    """torch.OutOfMemoryError raised in rank 1's solve of block 2 (a failpoint: a GPU too small for the block
    cannot be had here): not a death to recover from (it would fail again), but the user's to act on."""
    reference = quantize_once().output()
    out, fired = tmp_path / "out", tmp_path / "fired"
    proc = _run_with_failpoints(("1:2:solve:oom",), out, fired)
    assert proc.returncode == 1, proc.stderr[-3000:]
    plain = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(plain) == 1 and plain[0].startswith(
        "error: DeviceOutOfMemory: worker rank 1 ran out of device memory in block 2, stage solve "
        "(tried to allocate 1.00 GiB)."), plain
    assert "rayquant plan" in plain[0] and "cluster.num_workers" in plain[0] and "Traceback" not in proc.stderr
    assert not (out / "rayquant-manifest.json").exists()
    # the same command again (the failpoint has fired): resumes after the durable blocks, same bytes
    again = _run_with_failpoints(("1:2:solve:oom",), out, fired)
    assert again.returncode == 0, again.stderr[-3000:]
    assert log_events(again.stderr, "job_planned")[0]["resume_from"] >= 1
    assert output_files(out) == output_files(reference)

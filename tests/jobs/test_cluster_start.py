"""The job's Ray: embedded Ray starts whatever an earlier Ray left behind, a spec asking for GPUs the
cluster lacks is refused at once, the driver's wait ends at once naming a worker that died, and SIGTERM
ends a job as Ctrl-C does (real Ray, token authentication on; the real CLI for SIGTERM)."""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray
import structlog
from ray._private.utils import get_ray_address_file
from structlog.testing import capture_logs

from rayquant.jobs.cluster import (
    EMBEDDED, ClusterTooSmall, WorkerDied, check_resources, choose_ray, connect, create_workers, current_stage,
    disconnect, endpoint, probe, wait_all,
)
from rayquant.jobs.job_client import ClusterUnreachable
from rayquant.jobs.spec import ClusterSpec
from tests.ray_head import free_port

# no torch or transformers imported here: the test actors import this module as they start
REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "specs" / "tiny-llama.yaml"
STALE = "127.0.0.1:9"  # nothing listens there: a Ray that crashed long ago
BOGUS_RAY_ADDRESS = "10.255.255.1:6379"


class StageSleeper:
    """A stand-in for BlockWorker in WorkerHost: enters a (block, stage) and sleeps in it, or fails."""

    def __init__(self, setup: object):
        self.now: tuple[int | None, str] = (None, "starting")

    def join(self, rendezvous: str) -> int:
        return 0

    def sleep_in(self, block: int, stage: str, seconds: float) -> int:
        self.now = (block, stage)
        time.sleep(seconds)
        return block

    def fail(self, error: Exception) -> None:
        raise error

    def current_stage(self) -> tuple[int | None, str]:
        return self.now


def test_gpus_this_machine_lacks_are_refused_by_an_embedded_ray_started_despite_stale_leftovers(
        stale_ray_leftovers, monkeypatch) -> None:
    """A bogus RAY_ADDRESS and a stale last-cluster file: embedded Ray starts anyway (it is its resources
    the refusal names), logs what it ignored, and is shut down again with the refusal."""
    assert not ray.is_initialized()  # first in this module: its own Ray start
    monkeypatch.setenv("RAY_ADDRESS", BOGUS_RAY_ADDRESS)
    t = time.monotonic()
    with capture_logs() as logs, pytest.raises(ClusterTooSmall) as err:
        connect(ClusterSpec(num_workers=2, gpus_per_worker=1), verbose=False)
    assert time.monotonic() - t < 60
    assert str(err.value).startswith("cluster.num_workers=2 x cluster.gpus_per_worker=1 needs 2 GPU(s); "
                                     "the Ray cluster (embedded (127.0.0.1)) has 0: set cluster.gpus_per_worker: 0")
    assert not ray.is_initialized()  # connect shut its Ray down again
    ignored = [e for e in logs if e["event"] == "embedded_ray_ignores_earlier_ray"]
    assert ignored == [{"event": "embedded_ray_ignores_earlier_ray", "log_level": "info",
                        "ray_address_env": BOGUS_RAY_ADDRESS, "ray_current_cluster": STALE}]


@pytest.fixture(scope="module")
def stale_ray_leftovers() -> str:
    """Ray's last-cluster file naming a dead address, as a crashed `ray start` leaves it (restored after)."""
    path = Path(get_ray_address_file(None))
    before = path.read_text() if path.exists() else None
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(STALE)
    yield STALE
    if before is None:
        path.unlink(missing_ok=True)
    else:
        path.write_text(before)


@pytest.fixture(scope="module")
def embedded(stale_ray_leftovers: str):
    """connect() with no cluster.address while a bogus RAY_ADDRESS is set and the stale file is in place."""
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("RAY_ADDRESS", BOGUS_RAY_ADDRESS)
    try:
        cluster = connect(ClusterSpec(num_workers=2), verbose=False)
    finally:
        monkeypatch.undo()
    yield cluster
    disconnect(cluster)


def test_embedded_ray_starts_whatever_ray_address_and_the_last_cluster_file_say(embedded) -> None:
    assert embedded.where == EMBEDDED and embedded.owns_ray and embedded.loopback
    assert ray.cluster_resources()["CPU"] == 2  # its own Ray: exactly the workers' CPUs
    assert ray.get_runtime_context().gcs_address.startswith("127.0.0.1:")


@pytest.fixture
def sleepers(embedded) -> list:
    workers = create_workers(StageSleeper, 2, num_cpus=1, num_gpus=0)
    ray.get([w.setup.remote(None, "") for w in workers])
    yield workers
    for w in workers:
        ray.kill(w)


def test_wait_all_raises_the_failing_ranks_own_error_over_its_peers_peerfailed(sleepers) -> None:
    from rayquant.workers.rank_group import PeerFailed

    refs = [sleepers[0].call.remote("fail", PeerFailed("rank 0: another worker failed")),
            sleepers[1].call.remote("fail", ValueError("block 2: the real cause"))]
    with pytest.raises(ValueError, match="block 2: the real cause"):
        wait_all(refs, workers=sleepers)


def test_a_worker_killed_mid_wait_ends_the_wait_at_once_naming_its_rank_block_and_stage(sleepers) -> None:
    refs = [w.call.remote("sleep_in", 3, "collect", 60) for w in sleepers]
    time.sleep(1.0)  # both are in block 3's collect
    threading.Timer(1.0, ray.kill, [sleepers[1]]).start()
    t = time.monotonic()
    with pytest.raises(WorkerDied) as err:
        wait_all(refs, workers=sleepers)
    assert time.monotonic() - t < 6
    assert str(err.value).startswith("worker rank 1 died during block 3 (collect): ")
    assert "killed by `ray.kill`" in str(err.value) and "run the same command again" in str(err.value)


def test_a_worker_killed_mid_wait_without_the_actors_is_named_with_the_drivers_block(sleepers) -> None:
    refs = [w.call.remote("sleep_in", 5, "solve", 60) for w in sleepers]
    threading.Timer(1.0, ray.kill, [sleepers[0]]).start()
    structlog.contextvars.bind_contextvars(block=5)
    try:
        with pytest.raises(WorkerDied, match=r"^worker rank 0 died during block 5: "):
            wait_all(refs)
    finally:
        structlog.contextvars.unbind_contextvars("block")


def test_rank_0_killed_while_the_bar_asks_its_stage_ends_the_wait_as_worker_died(sleepers) -> None:
    """The progress bar asks rank 0 its stage between polls; when rank 0 has just died, that question gets no
    answer (None, at once) and the wait raises WorkerDied, which the driver recovers from — not Ray's
    ActorDiedError out of the bar (a race the fault test hit in CI)."""
    refs = [w.call.remote("sleep_in", 4, "advance", 60) for w in sleepers]
    time.sleep(1.0)
    ray.kill(sleepers[0])
    ray.wait(refs[:1], timeout=10.0)  # ray.kill returns before the actor is gone: a question now could be answered
    t = time.monotonic()
    assert current_stage(sleepers[0], timeout=10.0) is None
    assert time.monotonic() - t < 8  # the death answered, not the timeout
    asked = []
    with pytest.raises(WorkerDied, match=r"^worker rank 0 died during"):
        wait_all(refs, on_wait=lambda: asked.append(current_stage(sleepers[0])), workers=sleepers)


def test_choose_ray_follows_the_spec_then_a_ray_jobs_cluster_then_starts_embedded() -> None:
    env = {"RAY_ADDRESS": "10.0.0.5:6379"}
    assert choose_ray("ray://head:10001", env, STALE).address == "ray://head:10001"
    entrypoint = choose_ray(None, {**env, "RAY_JOB_CONFIG_JSON_ENV_VAR": "{}"}, STALE)
    assert entrypoint.address is None and "10.0.0.5:6379" in entrypoint.where and entrypoint.ignored == {}
    embedded = choose_ray(None, env, None)
    assert embedded.address == "local" and embedded.ignored == {"ray_address_env": "10.0.0.5:6379"}
    assert choose_ray(None, {}, None).ignored == {}


def test_endpoint_names_the_port_ray_init_connects_to_first() -> None:
    assert endpoint("ray://head:10002") == ("head", 10002)
    assert endpoint("ray://head") == ("head", 10001)
    assert endpoint("10.0.0.5:6380") == ("10.0.0.5", 6380)
    assert endpoint("head") == ("head", 6379)
    assert endpoint("ray://[::1]:10001") == ("::1", 10001)
    assert endpoint("auto") is None and endpoint("local") is None


def test_probe_refuses_an_address_nothing_listens_at_and_passes_one_that_listens() -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        probe(f"127.0.0.1:{listening.getsockname()[1]}")
        closed = free_port()
    t = time.monotonic()
    with pytest.raises(ClusterUnreachable, match=rf"nothing accepts a connection at 127.0.0.1:{closed} \(.*refused"):
        probe(f"ray://127.0.0.1:{closed}")
    assert time.monotonic() - t < 2


def test_check_resources_refuses_more_cpus_than_a_cluster_has() -> None:
    spec = ClusterSpec(address="10.0.0.5:6379", num_workers=4, cpus_per_worker=8)
    with pytest.raises(ClusterTooSmall, match=r"needs 32 CPU\(s\); the Ray cluster \(c\) has 16: lower"):
        check_resources(spec, {"CPU": 16.0, "GPU": 8.0}, "c")
    check_resources(spec, {"CPU": 32.0}, "c")  # exactly enough


def test_sigterm_ends_a_running_job_as_ctrl_c_does_and_the_rerun_resumes(tmp_path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC), "--set", f"output.uri={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((out / ".rayquant-staging").glob("*.done")):
            assert proc.poll() is None, proc.communicate()[1][-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # the driver alone, as `kill` or Kubernetes sends it
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / "rayquant-manifest.json").exists(), "the job finished before SIGTERM"
    plain = [line for line in stderr.splitlines() if not line.startswith("{")]
    assert plain == ["interrupted; run the same command again to resume after the last completed block"], stderr[-3000:]
    assert proc.returncode == 1  # as Ctrl-C (jobs/cli.py)
    resumed = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    planned = [e for e in map(json.loads, filter(lambda line: line.startswith("{"), resumed.stderr.splitlines()))
               if e["event"] == "job_planned"]
    # the interrupted run's log too: a rerun from block 0 (seen once in CI, 2026-12-07) needs both to explain
    assert planned and planned[0]["resume_from"] >= 1, (stderr[-3000:], resumed.stderr[-3000:])
    assert (out / "rayquant-manifest.json").exists()

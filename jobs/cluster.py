"""The job's Ray: connect (embedded on loopback, or a cluster address), start the worker actors, wait on them.

Imports only Ray (no torch), so the CLI can start Ray while another thread imports the driver's heavy
modules. Ray's own warnings and the workers' forwarded lines stay hidden unless the user asks (`-v`).
No job-level runtime_env: Ray starts idle worker processes while it starts, and reuses them for the
actors only when the job asks for no runtime environment (one second of start-up per worker on 2 cores).
"""

from __future__ import annotations

import gc
import importlib
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
import structlog

from rayquant.jobs.job_client import ClusterUnreachable
from rayquant.jobs.logs import configure_logging
from rayquant.jobs.signals import install_sigterm_handler
from rayquant.jobs.spec import ClusterSpec

log = structlog.get_logger()

# set by Ray's job supervisor for a submitted job's entrypoint, beside RAY_ADDRESS (the job's cluster)
RAY_JOB_ENTRYPOINT_VAR = "RAY_JOB_CONFIG_JSON_ENV_VAR"
EMBEDDED = "embedded (127.0.0.1)"
# a cluster.address that accepts no connection within this is refused: ray.init would retry it for minutes
PROBE_TIMEOUT_S = 5.0
RAY_CLIENT_PORT = 10001  # Ray Client's default (ray://host)
GCS_PORT = 6379  # the head's GCS default (host)


class ClusterTooSmall(Exception):
    """The spec asks for more GPUs or CPUs than the Ray cluster has: its workers would wait forever."""


class WorkerDied(Exception):
    """A worker's process ended (killed, out of memory, its node lost) while the driver waited on it."""

    def __init__(self, message: str, rank: int | None = None):
        super().__init__(message)
        self.rank = rank  # None: the rank is not known


@dataclass(frozen=True)
class Cluster:
    """The Ray this job runs on."""

    where: str  # "embedded (127.0.0.1)", the cluster address, or the Ray job's cluster
    owns_ray: bool  # this process started Ray (and shuts it down)
    started: float  # time.perf_counter() when connecting began: the job's start-up clock
    seconds: float  # to connect
    # one node, nothing listens beyond 127.0.0.1 (the workers' rendezvous too); False on a cluster, even
    # one found through a Ray job's RAY_ADDRESS with no cluster.address in the spec
    loopback: bool = True


@dataclass(frozen=True)
class RayTarget:
    """Which Ray `connect` joins: `address` as ray.init takes it."""

    address: str | None  # "local" = start an embedded Ray; None = RAY_ADDRESS (a Ray job's entrypoint)
    where: str
    ignored: dict[str, str]  # leftovers of an earlier Ray that embedded start-up does not follow


def choose_ray(address: str | None, env: Mapping[str, str], current_cluster: str | None) -> RayTarget:
    """cluster.address wins; without one, a Ray job's entrypoint joins that job's cluster; else embedded
    Ray starts, whatever RAY_ADDRESS or Ray's last-cluster file (`current_cluster`) say."""
    if address is not None:
        return RayTarget(address, address, {})
    if RAY_JOB_ENTRYPOINT_VAR in env:
        return RayTarget(None, f"the Ray job's cluster ({env.get('RAY_ADDRESS', 'auto')})", {})
    hints = {"ray_address_env": env.get("RAY_ADDRESS"), "ray_current_cluster": current_cluster}
    return RayTarget("local", EMBEDDED, {k: v for k, v in hints.items() if v})


def endpoint(address: str) -> tuple[str, int] | None:
    """The (host, port) a cluster address connects to first — ray://host[:port] the Ray Client server, host[:port]
    the head's GCS — or None where Ray finds the cluster itself ("auto", "local")."""
    if address in ("auto", "local"):
        return None
    scheme, sep, rest = address.partition("://")
    default = RAY_CLIENT_PORT if sep and scheme == "ray" else GCS_PORT
    place = (rest if sep else address).split("/", 1)[0]
    host, colon, port = place.rpartition(":")
    if not colon or not port.isdigit():
        host, port = place, str(default)
    return host.strip("[]"), int(port)


def probe(address: str, timeout: float = PROBE_TIMEOUT_S) -> None:
    """Refuse a cluster address nothing listens at before ray.init, which would retry it for minutes.

    Raises:
        ClusterUnreachable: the host does not resolve, refuses the connection or does not answer in `timeout`.
    """
    place = endpoint(address)
    if place is None:
        return
    try:
        socket.create_connection(place, timeout=timeout).close()
    except OSError as err:
        why = "no answer" if isinstance(err, TimeoutError) else (err.strerror or type(err).__name__)
        raise ClusterUnreachable(
            f"cluster.address {address!r}: nothing accepts a connection at {place[0]}:{place[1]} ({why}); start "
            f"the cluster or fix the address (the head's GCS as host:{GCS_PORT}, or ray://head:{RAY_CLIENT_PORT} "
            "for Ray Client), or remove cluster.address to run on embedded Ray") from None


def check_resources(spec: ClusterSpec, resources: Mapping[str, float], where: str) -> None:
    """Refuse a spec whose workers the cluster cannot place (they would stay pending forever).

    Raises:
        ClusterTooSmall: naming what the spec asks, what the cluster has and the fields to change.
    """
    gpus, cpus = spec.num_workers * spec.gpus_per_worker, spec.num_workers * spec.cpus_per_worker
    if gpus > resources.get("GPU", 0):
        raise ClusterTooSmall(
            f"cluster.num_workers={spec.num_workers} x cluster.gpus_per_worker={spec.gpus_per_worker} needs "
            f"{gpus} GPU(s); the Ray cluster ({where}) has {resources.get('GPU', 0):g}: set "
            f"cluster.gpus_per_worker: 0 (CPU workers), fewer cluster.num_workers, or a cluster.address with the GPUs")
    if cpus > resources.get("CPU", 0):
        raise ClusterTooSmall(
            f"cluster.num_workers={spec.num_workers} x cluster.cpus_per_worker={spec.cpus_per_worker} needs "
            f"{cpus} CPU(s); the Ray cluster ({where}) has {resources.get('CPU', 0):g}: lower "
            f"cluster.cpus_per_worker or cluster.num_workers")


def connect(spec: ClusterSpec, verbose: bool) -> Cluster:
    """Embedded Ray on loopback with exactly the CPUs the workers ask for (no cluster.address, not a Ray
    job's entrypoint), else the cluster at cluster.address or the Ray job's own. SIGTERM then ends the
    job as Ctrl-C does (ray.init replaces any earlier handler).

    Must run on the thread that lives for the whole job: embedded Ray's processes die with the thread
    that started them.

    Raises:
        ClusterUnreachable: nothing listens at cluster.address.
        ClusterTooSmall: the cluster lacks the GPUs or CPUs the spec's workers ask for.
    """
    t = time.perf_counter()
    if ray.is_initialized():
        return Cluster(where="already connected", owns_ray=False, started=t, seconds=0.0,
                       loopback=spec.address is None)
    quiet = {"logging_level": logging.WARNING if verbose else logging.ERROR, "log_to_driver": verbose}
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the workers' forwarded lines (-v): no ANSI codes in files
    target = choose_ray(spec.address, os.environ, _last_cluster_address())
    if target.address == "local":
        if target.ignored:
            log.info("embedded_ray_ignores_earlier_ray", **target.ignored)
        os.environ.pop("RAY_ADDRESS", None)  # Ray's own processes, started from this one, must not follow it
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray binds to loopback only
        ray.init(address="local", num_cpus=spec.num_workers * spec.cpus_per_worker, include_dashboard=False, **quiet)
    else:
        if target.address is not None:
            probe(target.address)
        ray.init(address=target.address, **quiet)
    if not verbose:
        _route_raylet_errors()
        # the calls a replaced set of workers never answered (jobs/driver._Crew) are errors nobody reads:
        # Ray would print each as "Unhandled error" when its reference is dropped
        os.environ.setdefault("RAY_IGNORE_UNHANDLED_ERRORS", "1")
    cluster = Cluster(where=target.where, owns_ray=True, started=t, seconds=time.perf_counter() - t,
                      loopback=target.address == "local")
    try:
        check_resources(spec, ray.cluster_resources(), cluster.where)
    except ClusterTooSmall:
        disconnect(cluster)
        raise
    install_sigterm_handler()
    return cluster


def _route_raylet_errors() -> None:
    """Ray's driver prints the raylet's error messages (a dead worker's post-mortem, ~600 characters) on
    stdout, where only the output path belongs, and off a terminal stderr holds JSON lines only: they
    become debug log lines instead. The job reports a dead worker itself (WorkerDied, workers_replaced).
    Ray's error listener looks the printer up in its module at each message, so replacing it takes effect."""
    from ray._private import worker as ray_worker

    printer = getattr(ray_worker, "print_to_stdstream", None)
    if printer is None or getattr(printer, "rayquant_routed", False):
        return

    def print_or_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("pid") == "raylet":
            log.debug("ray_error_message", lines=data.get("lines"))
        else:
            printer(data, ignore_prefix)

    print_or_log.rayquant_routed = True
    ray_worker.print_to_stdstream = print_or_log


def _last_cluster_address() -> str | None:
    """The address in Ray's last-cluster file (`ray start` writes it; a crashed Ray leaves it behind)."""
    from ray._private.utils import read_ray_address  # the file's location and format are Ray's

    return read_ray_address()


def disconnect(cluster: Cluster) -> None:
    """Leave the cluster; an embedded one is shut down."""
    if cluster.owns_ray:
        if cluster.loopback:
            _kill_autoscaler_monitor()
        ray.shutdown()


def _kill_autoscaler_monitor() -> None:
    """Embedded Ray's autoscaler monitor outlives the SIGTERM of Ray's shutdown, which waits its whole second
    of grace for it before a SIGKILL (1.02 s of a 1.4 s shutdown on the 2-core CPU machine; the 8B job's exit
    after job_done took 1.1 s longer embedded than on a standing head on an H100). Nothing of an embedded
    cluster scales: the monitor gets its SIGKILL first, and Ray's shutdown reaps it."""
    from ray._private import ray_constants
    from ray._private import worker as ray_worker

    node = getattr(ray_worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get(ray_constants.PROCESS_TYPE_MONITOR, []):
        if info.process.poll() is None:
            info.process.kill()


# the worker class a job runs, by name: the driver creates the actors before it has imported torch
WORKER_CLASS = "rayquant.workers.block_worker:BlockWorker"


class WorkerHost:
    """One worker's actor: imports the worker class as its process starts, then hosts one instance.

    Created right after Ray is up (the driver needs no torch for it), so every worker process imports
    torch and transformers while the driver imports its own and prepares the job. Logging is set up
    first: JSON lines into the worker's Ray log file (on the user's stderr with `-v`), debug with `-v`.
    """

    def __init__(self, worker_class: str | type, verbose: bool):
        configure_logging(verbose, terminal=False)
        t = time.perf_counter()
        if isinstance(worker_class, str):
            module, _, name = worker_class.partition(":")
            worker_class = getattr(importlib.import_module(module), name)
        # where a worker's start-up goes: the process's age when its class is imported, the import itself
        log.info("worker_imported", seconds=round(time.perf_counter() - t, 2), process_age_s=_process_age())
        self._class = worker_class
        self.worker = None

    def rendezvous_address(self, loopback: bool) -> str:
        """A free TCP address on this actor's node for the process group's store (asked of rank 0)."""
        from rayquant.workers.collectives import free_tcp_address  # imported with the worker class already

        return free_tcp_address(loopback)

    def setup(self, setup: Any, rendezvous: str) -> Any:
        """Build the worker and join the job's process group at `rendezvous`: everything the worker
        can do before the calibration windows arrive. Returns what the worker's join returns."""
        self.worker = self._class(setup)
        joined = self.worker.join(rendezvous)
        freeze_startup_objects()
        return joined

    def call(self, method: str, *args: Any) -> Any:
        """worker.<method>(*args) in this process; the driver's one way into the worker."""
        return getattr(self.worker, method)(*args)

    def current_stage(self) -> tuple[int | None, str]:
        return self.worker.current_stage() if self.worker is not None else (None, "starting")


def freeze_startup_objects() -> None:
    """Move every object alive now (the imports' modules, classes and functions: ~0.4 M objects) out of the
    garbage collector's reach. A full collection walks them all, 0.2 s on the 2-core CPU machine, and one
    fell inside a block at a varying point of the job (a block 16-52 % over its stage sum, once per run on
    the 8B job on an H100); frozen objects are never walked again. Objects made later are collected as
    before."""
    gc.freeze()


def _process_age() -> float | None:
    """Seconds since this process started (Linux: /proc), None elsewhere."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return round(time.time() - boot - ticks / os.sysconf("SC_CLK_TCK"), 2)


def create_workers(worker_class: str | type, n: int, num_cpus: int, num_gpus: int, verbose: bool = False) -> list:
    """n worker actors, returned at once: each process starts and imports the worker class meanwhile.

    `worker_class`: "module:Class" (imported in the worker process only) or a class. Three concurrent
    calls per actor: the block stages, `wait_durable` for the block being written, and `current_stage`
    for the progress bar.
    """
    actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=3)(WorkerHost)
    return [actor_class.remote(worker_class, verbose) for _ in range(n)]


def replace_workers(workers: list, worker_class: str | type, num_cpus: int, num_gpus: int, verbose: bool,
                    timeout: float = 60.0) -> list:
    """A fresh set of worker actors in place of `workers`, once every old one is gone.

    All ranks are replaced, not only a dead one: a process group that lost a member cannot be repaired
    (NCCL's communicators abort; the survivors may sit in a collective), and the survivors' calibration
    shards are mid-block. The old processes must be gone first: rank 0's writer may still be filling a
    shard the new rank 0 will write, and embedded Ray has CPUs for one set only.
    """
    for w in workers:
        ray.kill(w)
    deadline = time.monotonic() + timeout
    for w in workers:
        while time.monotonic() < deadline:
            try:
                ray.get(w.current_stage.remote(), timeout=max(0.1, deadline - time.monotonic()))
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                break
            time.sleep(0.05)  # ray.kill is asynchronous: the actor may answer once more
    return create_workers(worker_class, len(workers), num_cpus, num_gpus, verbose)


def wait_all(refs: list, on_wait: Callable[[], None] | None = None, poll_seconds: float = 0.5,
             workers: list | None = None, grace_seconds: float = 10.0) -> list:
    """Every call's result, in order, waiting on all ranks at once (calling `on_wait` between polls).

    `refs`: one call per rank in rank order, repeated for several calls per rank. A worker whose process
    dies ends the wait at once (WorkerDied; `workers`, the actors in rank order, are asked which stage
    the others are in). A raised error ends it once every rank has answered or `grace_seconds` after
    it: a failing rank makes its peers raise PeerFailed, so the failing rank's own error is raised.

    Raises:
        WorkerDied: naming the rank, the block and stage, and why Ray says it died.
    """
    from rayquant.workers.rank_group import PeerFailed  # the driver has imported torch by now

    ranks = _ranks(refs)
    index = {ref: i for i, ref in enumerate(refs)}
    results: dict[int, Any] = {}
    errors: dict[int, Exception] = {}
    pending, give_up = list(refs), None
    while pending and (give_up is None or time.monotonic() < give_up):
        ready, pending = ray.wait(pending, num_returns=1, timeout=poll_seconds)
        for ref in ready:
            i = index[ref]
            try:
                results[i] = ray.get(ref)
            except ray.exceptions.RayActorError as err:
                raise worker_died(err, ranks[i], _stages(workers, ranks[i])) from err
            except ray.exceptions.RayTaskError as err:
                errors[i] = err.cause if err.cause is not None else err
                give_up = give_up or time.monotonic() + grace_seconds
        if pending and not ready and on_wait is not None:
            on_wait()
    if errors:
        real = [e for _, e in sorted(errors.items()) if not isinstance(e, PeerFailed)]
        raise (real or list(errors.values()))[0]
    return [results[i] for i in range(len(refs))]


def _ranks(refs: list) -> list[int]:
    """The rank each call went to: its actor's place among the actors in order of first appearance."""
    actors: dict[Any, int] = {}
    return [actors.setdefault(ref.task_id().actor_id(), len(actors)) for ref in refs]


def _stages(workers: list | None, dead: int) -> list[tuple[int | None, str]]:
    """The (block, stage) of every rank but `dead` that answers within a second: where the job was."""
    if workers is None:
        return []
    stages = [current_stage(w, timeout=1.0) for r, w in enumerate(workers) if r != dead]
    return [s for s in stages if s is not None]


def worker_died(err: ray.exceptions.RayActorError, rank: int, peer_stages: list[tuple[int | None, str]]) -> WorkerDied:
    """One line for a dead worker: its rank, what the job was doing (the peers' stage, else the driver's
    block) and Ray's last word on why."""
    block = structlog.contextvars.get_contextvars().get("block")
    stage = None
    if peer_stages:
        block, stage = peer_stages[0]
    if block is None:
        doing = "start-up"
    else:
        doing = f"block {block} ({stage})" if stage else f"block {block}"
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    reason = lines[-1] if lines else type(err).__name__
    return WorkerDied(f"worker rank {rank} died during {doing}: {reason}; run the same command again to "
                      f"resume after the last completed block", rank=rank)


def current_stage(worker: Any, timeout: float = 0.2) -> tuple[int | None, str] | None:
    """Rank 0's (block, stage), or None if it does not answer within `timeout` (the bar keeps its text) or
    has died: its death is the block wait's to report (and recover from), not the progress bar's."""
    try:
        return ray.get(worker.current_stage.remote(), timeout=timeout)
    except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
        return None

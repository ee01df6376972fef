"""The job's Ray: connect (embedded on loopback, or a cluster address), start the worker actors, wait on them.

Imports only Ray (no torch), so the CLI can start Ray while another thread imports the driver's heavy
modules. Ray's own warnings and the workers' forwarded lines stay hidden unless the user asks (`-v`).
No job-level runtime_env: Ray starts idle worker processes while it starts, and reuses them for the
actors only when the job asks for no runtime environment (one second of start-up per worker on 2 cores).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable

import ray

from rayquant.jobs.logs import configure_logging
from rayquant.jobs.spec import ClusterSpec


@dataclass(frozen=True)
class Cluster:
    """The Ray this job runs on."""

    where: str  # "embedded (127.0.0.1)" or the cluster address
    owns_ray: bool  # this process started Ray (and shuts it down)
    started: float  # time.perf_counter() when connecting began: the job's start-up clock
    seconds: float  # to connect


def connect(spec: ClusterSpec, verbose: bool) -> Cluster:
    """Embedded Ray on loopback with exactly the CPUs the workers ask for (no cluster.address), else the
    cluster at cluster.address.

    Must run on the thread that lives for the whole job: embedded Ray's processes die with the thread
    that started them.
    """
    t = time.perf_counter()
    if ray.is_initialized():
        return Cluster(where="already connected", owns_ray=False, started=t, seconds=0.0)
    quiet = {"logging_level": logging.WARNING if verbose else logging.ERROR, "log_to_driver": verbose}
    if not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # the workers' forwarded lines (-v): no ANSI codes in files
    if spec.address is None:
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # embedded Ray binds to loopback only
        ray.init(num_cpus=spec.num_workers * spec.cpus_per_worker, include_dashboard=False, **quiet)
        where = "embedded (127.0.0.1)"
    else:
        ray.init(address=spec.address, **quiet)
        where = spec.address
    return Cluster(where=where, owns_ray=True, started=t, seconds=time.perf_counter() - t)


def disconnect(cluster: Cluster) -> None:
    if cluster.owns_ray:
        ray.shutdown()


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
        if isinstance(worker_class, str):
            module, _, name = worker_class.partition(":")
            worker_class = getattr(importlib.import_module(module), name)
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
        return self.worker.join(rendezvous)

    def call(self, method: str, *args: Any) -> Any:
        """worker.<method>(*args) in this process; the driver's one way into the worker."""
        return getattr(self.worker, method)(*args)

    def current_stage(self) -> tuple[int | None, str]:
        return self.worker.current_stage() if self.worker is not None else (None, "starting")


def create_workers(worker_class: str | type, n: int, num_cpus: int, num_gpus: int, verbose: bool = False) -> list:
    """n worker actors, returned at once: each process starts and imports the worker class meanwhile.

    `worker_class`: "module:Class" (imported in the worker process only) or a class. Three concurrent
    calls per actor: the block stages, `wait_durable` for the block being written, and `current_stage`
    for the progress bar.
    """
    actor_class = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=0, max_concurrency=3)(WorkerHost)
    return [actor_class.remote(worker_class, verbose) for _ in range(n)]


def wait_all(refs: list, on_wait: Callable[[], None] | None = None, poll_seconds: float = 0.5) -> list:
    """Wait for every rank's call (calling `on_wait` between polls); raise the first real error.

    A rank that fails makes its peers raise the worker's PeerFailed: the failing rank's own error is
    the one to report.
    """
    from rayquant.workers.block_worker import PeerFailed  # the driver has imported it by now

    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=poll_seconds if on_wait else None)
        if pending and on_wait is not None:
            on_wait()
    errors, results = [], {}
    for i, ref in enumerate(refs):
        try:
            results[i] = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            errors.append(err.cause if err.cause is not None else err)
    real = [e for e in errors if not isinstance(e, PeerFailed)]
    if errors:
        raise (real or errors)[0]
    return [results[i] for i in range(len(refs))]


def current_stage(worker: Any, timeout: float = 0.2) -> tuple[int | None, str] | None:
    """Rank 0's (block, stage), or None if it does not answer within `timeout` (the bar keeps its text)."""
    try:
        return ray.get(worker.current_stage.remote(), timeout=timeout)
    except ray.exceptions.GetTimeoutError:
        return None

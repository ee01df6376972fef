"""The Python API: what `rayquant quantize | submit | status | logs | stop` do, for notebooks and pipelines.

    from rayquant.jobs.api import quantize, submit
    outcome = quantize("jobs/specs/tiny-llama.yaml", set=["output.uri=/tmp/out"])   # here, embedded Ray
    job = submit(spec, address="http://HEAD:8265"); job.wait(); print(job.logs())    # a cluster's Jobs API

A spec is a `JobSpec`, a dict of its sections, or the path of a YAML spec file; `set` items are the CLI's
`--set` overrides. Errors are the CLI's typed exceptions (those of jobs/input_errors.py are the user's to fix),
plus `JobFailed` and `JobWaitTimeout` from `JobHandle.wait`. The cluster address and token are found as
the CLI finds them (jobs/job_client.py): the token is never stored on the handle.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from rayquant.jobs.job_status import JobStatusView
from rayquant.jobs.spec import JobSpec, SpecError, apply_overrides, describe_validation_error, load_spec

if TYPE_CHECKING:
    from rayquant.jobs.driver import JobOutcome

TERMINAL = ("SUCCEEDED", "FAILED", "STOPPED")  # Ray's job statuses that never change again


class JobFailed(Exception):
    """A submitted job ended FAILED or STOPPED."""


class JobWaitTimeout(TimeoutError):
    """`JobHandle.wait` gave up before the job ended (the job keeps running)."""


def resolve_spec(spec: JobSpec | dict | str | Path, overrides: Sequence[str] = ()) -> JobSpec:
    """The validated spec from a `JobSpec`, a dict of its sections or a YAML file's path, with `--set` items applied.

    Raises:
        SpecError: the file is unreadable, a field is unknown or invalid, an override is malformed, or `spec`
            is none of those types.
    """
    if isinstance(spec, (str, Path)):
        return load_spec(Path(spec), list(overrides))
    if isinstance(spec, JobSpec):
        if not overrides:
            return spec
        spec = spec.model_dump(mode="json")
    if not isinstance(spec, dict):
        raise SpecError(f"spec: got a {type(spec).__name__}; pass a JobSpec, a dict of spec sections or the path "
                        "of a YAML spec file (e.g. jobs/specs/tiny-llama.yaml)")
    try:
        return JobSpec.model_validate(apply_overrides(spec, list(overrides)))
    except ValidationError as err:
        raise SpecError(describe_validation_error(err)) from err


def quantize(spec: JobSpec | dict | str | Path, *, set: Sequence[str] = (), verbose: bool = False) -> JobOutcome:
    """Run the job here, as `rayquant quantize` does: embedded Ray on 127.0.0.1, or the spec's cluster.address.

    Must be called on a thread that lives for the whole job (embedded Ray's processes die with the thread that
    started them). Logs go to stderr as the CLI's do unless the caller configured structlog already.

    Raises:
        the typed input errors of jobs/input_errors.py (SpecError, ModelNotFound, OutputConflict, ...).
    """
    import structlog

    from rayquant.jobs.logs import configure_logging

    job_spec = resolve_spec(spec, set)
    if not structlog.is_configured():  # structlog's own default prints every debug line to stdout
        configure_logging(verbose)
    return run_quantize(job_spec, verbose)


def run_quantize(spec: JobSpec, verbose: bool) -> JobOutcome:
    """`rayquant quantize`'s run: Ray starts on this thread while another imports torch and the driver, and the
    worker actors are created as soon as Ray is up, so they import torch beside the driver's own import."""
    import importlib
    import time
    import uuid
    from concurrent.futures import ThreadPoolExecutor

    import structlog

    from rayquant.jobs import cluster as ray_cluster  # Ray only, no torch

    c = spec.cluster
    job_id = uuid.uuid4().hex[:12]
    structlog.contextvars.bind_contextvars(job_id=job_id, block=None)
    structlog.get_logger().info("job_starting", job=spec.name, ray=c.address or "embedded (127.0.0.1)",
                                workers=c.num_workers, gpus_per_worker=c.gpus_per_worker,
                                cpus_per_worker=c.cpus_per_worker)
    with ThreadPoolExecutor(1, thread_name_prefix="import-driver") as pool:
        driver = pool.submit(importlib.import_module, "rayquant.jobs.driver")
        cluster = ray_cluster.connect(c, verbose=verbose)
        try:
            workers = ray_cluster.create_workers(ray_cluster.WORKER_CLASS, c.num_workers, c.cpus_per_worker,
                                                 c.gpus_per_worker, verbose)
            t = time.perf_counter()
            run_job = driver.result().run_job
            structlog.get_logger().info("driver_imported", waited_s=round(time.perf_counter() - t, 2))
            return run_job(spec, job_id, cluster=cluster, verbose=verbose, workers=workers)
        finally:
            ray_cluster.disconnect(cluster)


def submit(spec: JobSpec | dict | str | Path, *, set: Sequence[str] = (), address: str | None = None) -> JobHandle:
    """Submit the job to a Ray cluster, as `rayquant submit` does; the same work submitted again returns its job.

    `address`: the Jobs API (http://HEAD:8265), else the spec's cluster.address, else RAY_ADDRESS.

    Raises:
        SpecError: the spec is invalid or cannot run on a cluster (a local output without output.shared).
        NoClusterAddress, ClusterUnreachable, ClusterAuthFailed: no address, nothing answers, token refused.
        the source's input errors (ModelNotFound, ...): its revision names the job.
    """
    from rayquant.jobs.job_client import cluster_address
    from rayquant.jobs.submission import submit_spec

    job_spec = resolve_spec(spec, set)
    job = submit_spec(job_spec, address)
    # the address it went to, so the handle still reaches it if RAY_ADDRESS changes later
    return JobHandle(job.job_id, cluster_address(address, job_spec.cluster.address, os.environ).url)


@dataclass(frozen=True)
class JobHandle:
    """A rayquant job on a Ray cluster: `rayquant status | logs | stop` as methods, and `wait`.

    `address`: the cluster's Jobs API, else RAY_ADDRESS at each call. Every call connects afresh with the
    token found then (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token).
    """

    job_id: str
    address: str | None = None

    def status(self) -> JobStatusView:
        """Ray's status of the job and its own progress (blocks done, stage, ETA), as `rayquant status` shows.

        Raises:
            JobNotFound, NoClusterAddress, ClusterUnreachable, ClusterAuthFailed.
        """
        from rayquant.jobs.submission import job_status

        return job_status(self._client(), self.job_id)

    def logs(self) -> str:
        """The job's log so far (its JSON log lines and Ray's), as `rayquant logs` prints it.

        Raises:
            JobNotFound, NoClusterAddress, ClusterUnreachable, ClusterAuthFailed.
        """
        from rayquant.jobs.submission import write_logs

        parts: list[str] = []
        write_logs(self._client(), self.job_id, follow=False, write=parts.append)
        return "".join(parts)

    def wait(self, timeout_s: float | None = None, poll_s: float = 1.0) -> JobStatusView:
        """Poll until the job ends; its final status if it SUCCEEDED.

        Raises:
            JobFailed: the job ended FAILED or STOPPED (the message has Ray's reason).
            JobWaitTimeout: it still runs after `timeout_s`.
            JobNotFound, NoClusterAddress, ClusterUnreachable, ClusterAuthFailed.
        """
        from rayquant.jobs.submission import job_status

        client = self._client()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        view = job_status(client, self.job_id)
        while view.ray_status not in TERMINAL:
            if deadline is not None and time.monotonic() >= deadline:
                raise JobWaitTimeout(f"job {self.job_id} is still {view.ray_status} after {timeout_s} s "
                                     f"({_progress(view)}); call wait() again or raise timeout_s")
            time.sleep(poll_s if deadline is None else max(0.0, min(poll_s, deadline - time.monotonic())))
            view = job_status(client, self.job_id)
        if view.ray_status != "SUCCEEDED":
            raise JobFailed(f"job {self.job_id} ended {view.ray_status}: {view.message or 'no message from Ray'} "
                            f"({_progress(view)}); read logs() for the cause, then submit the same spec again: "
                            "it resumes after the last finished block")
        return view

    def stop(self) -> str:
        """Stop the job and wait until Ray says it ended; its final status (submit the same spec to resume).

        Raises:
            JobNotFound, NoClusterAddress, ClusterUnreachable, ClusterAuthFailed.
        """
        from rayquant.jobs.submission import stop_job

        return stop_job(self._client(), self.job_id)

    def _client(self):
        from rayquant.jobs.job_client import cluster_address, cluster_token, connect_jobs_api

        return connect_jobs_api(cluster_address(self.address, None, os.environ),
                                cluster_token(os.environ, Path.home()))


def _progress(view: JobStatusView) -> str:
    if view.n_blocks is None:
        return f"progress: {view.progress_from}"
    return f"{view.blocks_done}/{view.n_blocks} blocks"

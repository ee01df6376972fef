"""`rayquant submit | status | logs | stop | list`: rayquant jobs on a Ray cluster, over Ray's Jobs API.

A submitted job runs the same `rayquant quantize` a user runs by hand, as the job's entrypoint on the
cluster's head, with the resolved spec in the command line (one `--set section=<JSON>` per spec section:
no file has to reach the cluster, and no runtime_env, so the workers start in Ray's prestarted processes).
In the job the spec says `cluster.address: auto`: its `ray.init` joins the cluster the job runs on (Ray's
job supervisor sets RAY_ADDRESS to it). Relative local paths (model, calibration data, output) are made
absolute here, because the job does not run in this directory.

Job ids: `rq-<fingerprint[:16]>` for the first attempt, `rq-<fingerprint[:16]>-<n>` after it, the
fingerprint being `JobSpec.fingerprint` of the resolved source revision (the same identity the output's
manifest records). Submitting work whose latest attempt is pending, running or succeeded returns that
attempt; one that failed or was stopped is submitted again as the next attempt, and resumes from the
last durable block of its output (the driver's markers). Job metadata (all strings, as Ray requires):
rayquant_spec, rayquant_fingerprint, rayquant_output, rayquant_work_dir, rayquant_attempt.
"""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from rayquant.jobs.job_status import JobStatusView, job_status_view
from rayquant.jobs.spec import JobSpec, SpecError

ID_PREFIX = "rq-"
ACTIVE = ("PENDING", "RUNNING", "SUCCEEDED")  # a submission of the same work returns such an attempt
STOP_WAIT_S = 60.0  # `stop` waits this long for the job to end (Ray sends SIGTERM, then SIGKILL)


class JobNotFound(Exception):
    """No rayquant job on the cluster has this id."""


@dataclass(frozen=True)
class SubmittedJob:
    job_id: str
    status: str  # Ray's status when submit returned
    new: bool  # False: the same work was submitted before and this is that job


@dataclass(frozen=True)
class ListedJob:
    job_id: str
    status: str
    spec: str
    output: str
    start_time: int  # ms since the epoch, as Ray reports it (0 while pending)


def job_base_id(fingerprint: str) -> str:
    return f"{ID_PREFIX}{fingerprint[:16]}"


def attempt_id(fingerprint: str, attempt: int) -> str:
    return job_base_id(fingerprint) if attempt == 1 else f"{job_base_id(fingerprint)}-{attempt}"


def spec_for_cluster(spec: JobSpec, cwd: Path) -> JobSpec:
    """The spec the job runs: `cluster.address: auto` and local paths made absolute against `cwd`.

    Raises:
        SpecError: a local output that no setting declares visible to every Ray node.
    """
    body = spec.model_dump(mode="json")
    body["cluster"]["address"] = "auto"
    for section, key in (("model", "source"), ("calibration", "dataset"), ("output", "uri"), ("output", "work_dir")):
        value = body[section][key]
        if value is not None and "://" not in value:
            body[section][key] = str((cwd / Path(value).expanduser()).resolve())
    out = body["output"]
    if not out["shared"]:
        raise SpecError(
            f"rayquant submit: output.uri={spec.output.uri!r} is built on the cluster's nodes; set output.shared: "
            "true if it (or output.work_dir, for s3:// and hf://) is a mount every Ray node sees at that path")
    if "://" in out["uri"] and out["work_dir"] is None:
        raise SpecError(f"rayquant submit: output.uri={out['uri']!r} is built in output.work_dir before the upload; "
                        "set output.work_dir to a mount every Ray node sees, with output.shared: true")
    return JobSpec.model_validate(body)


def work_dir_of(spec: JobSpec) -> Path:
    """Where the job builds its output (and keeps its progress record): output.uri, or output.work_dir for
    s3:// and hf:// (`spec_for_cluster` requires it there)."""
    return Path(spec.output.work_dir if spec.output.remote else spec.output.uri)


def entrypoint(spec: JobSpec) -> str:
    """`exec rayquant quantize --set name=... --set model={...} ...`: the whole spec, quoted for Ray's shell.

    `exec`: Ray runs the entrypoint with `sh -c` and `stop` signals the processes it finds at that moment.
    Without it the shell forks rayquant; a stop in the instant before the fork killed only the shell, and
    the orphaned rayquant ran the job to its end while Ray reported it STOPPED."""
    sets = [f"{section}={json.dumps(value, sort_keys=True)}" for section, value in spec.model_dump(mode="json").items()]
    return " ".join(["exec", "rayquant", "quantize", *(f"--set {shlex.quote(item)}" for item in sets)])


def submit(client, spec: JobSpec, fingerprint: str, work_dir: Path) -> SubmittedJob:
    """Submit `spec` (as `spec_for_cluster` made it) unless its latest attempt is pending, running or done."""
    attempts = _attempts(client, fingerprint)
    if attempts and attempts[-1].status in ACTIVE:
        return SubmittedJob(attempts[-1].submission_id, str(attempts[-1].status), new=False)
    attempt = len(attempts) + 1
    metadata = {"rayquant_spec": spec.name, "rayquant_fingerprint": fingerprint, "rayquant_output": spec.output.uri,
                "rayquant_work_dir": str(work_dir), "rayquant_attempt": str(attempt)}
    job_id = attempt_id(fingerprint, attempt)
    try:
        client.submit_job(entrypoint=entrypoint(spec), submission_id=job_id, metadata=metadata)
    except RuntimeError as err:
        if "already exists" not in str(err):
            raise
        # submitted meanwhile by another `rayquant submit` of the same work: that one is this job
    return SubmittedJob(job_id, str(client.get_job_status(job_id)), new=True)


def submit_spec(spec: JobSpec, address: str | None, cwd: Path | None = None) -> SubmittedJob:
    """Submit a loaded spec to the cluster at `address` (else the spec's cluster.address, else RAY_ADDRESS), with
    the cluster's token: what `rayquant submit` and `rayquant reconcile` do.

    Raises:
        SpecError: the spec cannot run on a cluster (see spec_for_cluster).
        the cluster errors of jobs/job_client.py (no address, unreachable, token refused).
    """
    import os

    from rayquant.jobs.job_client import cluster_address, cluster_token, connect_jobs_api
    from rayquant.storage.model_source import open_model_source  # torch: after the cheap checks

    job_spec = spec_for_cluster(spec, cwd or Path.cwd())
    client = connect_jobs_api(cluster_address(address, spec.cluster.address, os.environ),
                              cluster_token(os.environ, Path.home()))
    fingerprint = job_spec.fingerprint(open_model_source(job_spec.model.source).revision)
    return submit(client, job_spec, fingerprint, work_dir_of(job_spec))


def _attempts(client, fingerprint: str) -> list:
    """The cluster's attempts at this work (its rayquant jobs with this fingerprint), oldest first."""
    found = [j for j in client.list_jobs() if (j.metadata or {}).get("rayquant_fingerprint") == fingerprint]
    return sorted(found, key=lambda j: int(j.metadata.get("rayquant_attempt", "1")))


def find_job(client, job_id: str):
    """Ray's record (`JobDetails`) of the rayquant job `job_id`.

    Raises:
        JobNotFound: the cluster has no rayquant job with that id.
    """
    for job in client.list_jobs():
        if job.submission_id == job_id and "rayquant_fingerprint" in (job.metadata or {}):
            return job
    raise JobNotFound(f"the cluster has no rayquant job {job_id!r}; `rayquant list` shows its jobs and their ids")


def job_status(client, job_id: str) -> JobStatusView:
    """Ray's status of the job and the job's own progress record.

    Raises:
        JobNotFound: no rayquant job has this id.
    """
    job = find_job(client, job_id)
    return job_status_view(job_id, str(job.status), job.metadata, job.message if str(job.status) != "RUNNING" else None)


def list_jobs(client) -> list[ListedJob]:
    """Every rayquant job the cluster knows, running and finished, oldest first."""
    jobs = [ListedJob(job_id=j.submission_id, status=str(j.status), spec=j.metadata["rayquant_spec"],
                      output=j.metadata.get("rayquant_output", "?"), start_time=j.start_time or 0)
            for j in client.list_jobs() if "rayquant_fingerprint" in (j.metadata or {})]
    return sorted(jobs, key=lambda j: (j.start_time == 0, j.start_time, j.job_id))


def stop_job(client, job_id: str, wait_s: float = STOP_WAIT_S) -> str:
    """Stop a running job and wait until Ray says it ended; returns its final status.

    Raises:
        JobNotFound: no rayquant job has this id.
    """
    find_job(client, job_id)
    client.stop_job(job_id)
    deadline = time.monotonic() + wait_s
    status = str(client.get_job_status(job_id))
    while status in ("PENDING", "RUNNING") and time.monotonic() < deadline:
        time.sleep(0.5)
        status = str(client.get_job_status(job_id))
    return status


def write_logs(client, job_id: str, follow: bool, write: Callable[[str], None]) -> None:
    """The job's log so far (`follow`: and every line after, until the job ends) through `write`.

    Raises:
        JobNotFound: no rayquant job has this id.
    """
    find_job(client, job_id)
    if not follow:
        write(client.get_job_logs(job_id))
        return

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):  # ends when the job does
            write(chunk)

    asyncio.run(tail())

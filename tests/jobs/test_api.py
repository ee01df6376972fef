"""The Python API (jobs/api.py): `quantize` on the embedded Ray, `submit` and `JobHandle` against the session's
real Ray head (tests/jobs/conftest.py, token auth on).

One tiny job on the head, of its own name (so not the job of tests/jobs/test_submission.py, which checks its
own output): submitted, stopped at once (`wait` raises JobFailed), submitted again (attempt 2) and waited for.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from rayquant.jobs.api import JobFailed, JobHandle, JobWaitTimeout, quantize, resolve_spec, submit
from rayquant.jobs.job_client import NoClusterAddress
from rayquant.jobs.job_status import JobStatusView
from rayquant.jobs.spec import SpecError, load_spec
from rayquant.jobs.submission import JobNotFound
from tests.ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "specs" / "tiny-llama.yaml"
JOB_TIMEOUT_S = 240


def test_quantize_runs_the_tiny_spec_to_a_finished_output(tmp_path: Path):
    out = tmp_path / "out"
    outcome = quantize(TINY, set=[f"output.uri={out}"])
    manifest = json.loads((out / "rayquant-manifest.json").read_text())
    assert (outcome.uri, outcome.n_blocks, outcome.resumed_from, outcome.already_complete) == (str(out), 4, 0, False)
    assert manifest["n_blocks"] == 4 and len(outcome.block_stats) == 4


def test_a_dict_spec_with_overrides_is_the_yaml_spec():
    as_dict = load_spec(TINY).model_dump(mode="json")
    spec = resolve_spec(as_dict, ["quant.bits=8", "output.uri=/tmp/x"])
    assert spec == load_spec(TINY, ["quant.bits=8", "output.uri=/tmp/x"])
    assert resolve_spec(spec) is spec and resolve_spec(str(TINY)) == load_spec(TINY)
    assert resolve_spec(spec, ["name=other"]).name == "other"
    assert as_dict["quant"]["bits"] == 4  # the caller's dict is not changed


def test_a_bad_dict_spec_is_a_spec_error_naming_the_field():
    with pytest.raises(SpecError, match=r"quant\.bitz: unknown key; remove it"):
        quantize({"quant": {"bitz": 4}})
    with pytest.raises(SpecError, match="quant.bits"):
        quantize({"quant": {"bits": 5}})
    with pytest.raises(SpecError, match="pass a JobSpec, a dict of spec sections or the path"):
        quantize(42)
    with pytest.raises(SpecError, match="expected key.path=value"):
        resolve_spec({}, ["quant.bits"])


def test_submit_without_any_address_says_how_to_name_one(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(NoClusterAddress, match="--address"):
        submit(TINY, set=["output.shared=true", "output.uri=/tmp/rq-api-none"])


@dataclass(frozen=True)
class Submitted:
    first: JobHandle
    timed_out: JobWaitTimeout
    stop: str
    failed: JobFailed
    again: JobHandle
    done: JobStatusView
    status: JobStatusView
    logs: str
    out: Path


@pytest.fixture(scope="module")
def submitted(ray_head: RayHead, tmp_path_factory) -> Iterator[Submitted]:
    out = tmp_path_factory.mktemp("api-submitted") / "out"
    sets = ["name=tiny-api", "cluster.num_workers=1", "output.shared=true", f"output.uri={out}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_AUTH_TOKEN", ray_head.token)
        first = submit(TINY, set=sets, address=ray_head.address)
        with pytest.raises(JobWaitTimeout) as timed_out:
            first.wait(timeout_s=0.2, poll_s=0.1)
        # stop it once its entrypoint runs: the test wants a job that ran and was stopped (a stop in its first
        # instant used to reach only the shell, CI 2026-12-07; the entrypoint now execs rayquant)
        deadline = time.monotonic() + 60
        while '"job_starting"' not in first.logs() and time.monotonic() < deadline:
            time.sleep(0.2)
        stop = first.stop()
        with pytest.raises(JobFailed) as failed:
            first.wait(timeout_s=30)
        again = submit(load_spec(TINY, sets), address=ray_head.address)
        done = again.wait(timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
        yield Submitted(first=first, timed_out=timed_out.value, stop=stop, failed=failed.value, again=again,
                        done=done, status=again.status(), logs=again.logs(), out=out)


def test_submitted_job_is_waited_for_to_a_finished_output(submitted: Submitted, ray_head: RayHead):
    assert submitted.first.address == ray_head.address and submitted.first.job_id.startswith("rq-")
    assert submitted.again.job_id == f"{submitted.first.job_id}-2"  # the stopped work's next attempt
    assert (submitted.done.ray_status, submitted.done.blocks_done, submitted.done.n_blocks) == ("SUCCEEDED", 4, 4)
    assert submitted.status == submitted.done
    manifest = json.loads((submitted.out / "rayquant-manifest.json").read_text())
    assert submitted.first.job_id == f"rq-{manifest['job_fingerprint'][:16]}"
    events = [json.loads(line)["event"] for line in submitted.logs.splitlines() if line.startswith("{")]
    assert "job_planned" in events and events[-1] == "job_done"


def test_wait_raises_on_a_stopped_job_and_on_its_timeout(submitted: Submitted):
    assert submitted.stop == "STOPPED"
    failed = str(submitted.failed)
    assert failed.startswith(f"job {submitted.first.job_id} ended STOPPED:") and "submit the same spec again" in failed
    assert "after 0.2 s" in str(submitted.timed_out) and "raise timeout_s" in str(submitted.timed_out)
    assert isinstance(submitted.timed_out, TimeoutError)


def test_handle_of_an_unknown_job_says_how_to_find_ids(ray_head: RayHead, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head.token)
    with pytest.raises(JobNotFound, match="`rayquant list`"):
        JobHandle("rq-doesnotexist", ray_head.address).status()

"""Claims and job locks on the three kinds of output (a local directory, the real S3 server of
tests/s3_server.py, the local Hub of tests/hub_server.py): of two writers at once exactly one wins, a stale
record is taken over, a renewed lock stays fresh, and nobody removes a record that is not theirs."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable

import pytest

from rayquant.storage import output_claims
from rayquant.storage.hub_files import resolve_hub_revision
from rayquant.storage.output_claims import (
    OutputLock,
    OutputLocked,
    OutputLockLost,
    claim_output,
    read_claim,
    release_claim,
)
from structlog.testing import capture_logs

BUCKET = "claims-test"
KINDS = ("local", "s3", "hub")


@pytest.fixture(autouse=True)
def no_wait_for_the_same_job(monkeypatch):
    """These tests contend with one fingerprint and expect a live holder refused at once; the driver's wait
    for a live holder of the same job is tests/e2e/test_quantize.py's."""
    monkeypatch.setattr(output_claims, "SAME_JOB_WAIT_S", 0.0)


@pytest.fixture(params=KINDS)
def output_uri(request, tmp_path) -> str:
    """A fresh output URI of each kind, with its server's environment set for the test."""
    suffix = uuid.uuid4().hex[:8]
    if request.param == "local":
        return str(tmp_path / f"out-{suffix}")
    if request.param == "s3":
        server = request.getfixturevalue("s3_env")
        server.create_bucket(BUCKET)
        return f"s3://{BUCKET}/out-{suffix}"
    request.getfixturevalue("hub_env")
    return f"hf://rayquant-test/out-{suffix}"


def at_once(n: int, call: Callable[[int], object]) -> list[object]:
    """call(i) for i < n on n threads released together; their results (or exceptions) in order."""
    barrier = threading.Barrier(n)
    results: list[object] = [None] * n

    def run(i: int) -> None:
        barrier.wait()
        try:
            results[i] = call(i)
        except Exception as err:  # noqa: BLE001 - returned for the test to assert on
            results[i] = err

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_two_claimers_at_once_one_wins_and_the_other_sees_its_claim(output_uri):
    results = at_once(2, lambda i: claim_output(output_uri, "fp-a", f"claimer-{i}", stale_after_s=3600))
    assert sorted(r.won for r in results) == [False, True], results
    winner = next(r for r in results if r.won)
    loser = next(r for r in results if not r.won)
    assert loser.claim == winner.claim
    assert read_claim(output_uri) == winner.claim


def test_fresh_claim_of_another_job_is_not_taken_and_a_stale_one_of_this_job_is(output_uri):
    first = claim_output(output_uri, "fp-a", "claimer-1", stale_after_s=3600)
    assert first.won
    other_job = claim_output(output_uri, "fp-b", "claimer-2", stale_after_s=0.0)
    assert (other_job.won, other_job.claim) == (False, first.claim)  # another fingerprint: never taken over
    fresh = claim_output(output_uri, "fp-a", "claimer-2", stale_after_s=3600)
    assert (fresh.won, fresh.claim) == (False, first.claim)
    time.sleep(0.6)  # first's claim is stale after 0.5 s; the winner's stays fresh while the loser looks
    results = at_once(2, lambda i: claim_output(output_uri, "fp-a", f"taker-{i}", stale_after_s=0.5))
    winners = [r for r in results if r.won]
    assert len(winners) == 1, results
    # the winner took the stale claim over, or (local: while the taker had moved it aside) created anew
    assert winners[0].replaced in (first.claim, None) and winners[0].claim.holder.startswith("taker-")
    assert read_claim(output_uri) == winners[0].claim


def test_release_claim_removes_only_the_claim_it_names(output_uri):
    mine = claim_output(output_uri, "fp-a", "claimer-1", stale_after_s=3600).claim
    time.sleep(0.05)
    theirs = claim_output(output_uri, "fp-a", "claimer-2", stale_after_s=0.01).claim
    assert release_claim(output_uri, mine) is False
    assert read_claim(output_uri) == theirs
    assert release_claim(output_uri, theirs) is True
    assert read_claim(output_uri) is None


def test_second_job_on_a_locked_output_gets_output_locked_naming_the_running_job(output_uri):
    with OutputLock(output_uri, "job-running", "fp-a", stale_after_s=60) as lock:
        assert lock.held is not None and lock.held.holder == "job-running"
        with pytest.raises(OutputLocked) as err:
            OutputLock(output_uri, "job-second", "fp-a", stale_after_s=60).acquire()
        assert "job-running" in str(err.value) and "wait for that job" in str(err.value)
    with OutputLock(output_uri, "job-second", "fp-a", stale_after_s=60) as second:  # released: free again
        assert second.held.holder == "job-second"


def test_two_jobs_locking_at_once_one_runs(output_uri):
    locks = [OutputLock(output_uri, f"job-{i}", "fp-a", stale_after_s=60) for i in range(2)]
    results = at_once(2, lambda i: locks[i].acquire())
    assert sorted(type(r).__name__ for r in results) == ["NoneType", "OutputLocked"], results
    for lock, result in zip(locks, results, strict=True):
        if result is None:
            lock.release()


def test_renewal_keeps_the_lock_fresh_past_stale_after_s(output_uri):
    with OutputLock(output_uri, "job-long", "fp-a", stale_after_s=1.5) as lock:
        first = lock.held
        time.sleep(2.0)  # longer than stale_after_s: only the renewals (every 0.5 s) keep it
        assert lock.held.time > first.time
        with pytest.raises(OutputLocked):
            OutputLock(output_uri, "job-other", "fp-a", stale_after_s=1.5).acquire()
        lock.check()


def test_renewals_from_two_threads_at_once_never_lose_the_lock(output_uri):
    """The caller's renew() and the renewal thread's both rewrite the record on the version last written: one
    at a time, or the second finds the first's write in its place and takes its own lock for lost (a CI race)."""
    with OutputLock(output_uri, "job-1", "fp-a", stale_after_s=3600) as lock:
        assert at_once(4, lambda i: lock.renew()) == [True] * 4
        lock.check()
        assert lock.held is not None


def test_stale_lock_is_taken_over_and_its_old_holder_removes_nothing(output_uri):
    dead = OutputLock(output_uri, "job-dead", "fp-a", stale_after_s=3600)  # renews hourly: never in this test
    dead.acquire()
    time.sleep(0.3)
    with capture_logs() as logs, OutputLock(output_uri, "job-new", "fp-a", stale_after_s=0.2) as new:
        taken = [e for e in logs if e["event"] == "output_lock_taken_over"]
        assert taken and taken[0]["previous_job"] == "job-dead"
        assert dead.renew() is False
        with pytest.raises(OutputLockLost, match="job-new"):
            dead.check()
        dead.release()  # lost: must leave job-new's lock alone
        with pytest.raises(OutputLocked, match="job-new"):
            OutputLock(output_uri, "job-third", "fp-a", stale_after_s=60).acquire()
        assert new.held.holder == "job-new"


def test_s3_claim_and_lock_are_objects_beside_the_output(s3_env):
    s3_env.create_bucket(BUCKET)
    prefix = f"out-{uuid.uuid4().hex[:8]}"
    uri = f"s3://{BUCKET}/{prefix}"
    claim_output(uri, "fp-a", "claimer-1", stale_after_s=3600)
    with OutputLock(uri, "job-1", "fp-a"):
        keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
        assert keys == [f"{prefix}/.rayquant-claim.json", f"{prefix}/.rayquant-lock.json"]
    keys = sorted(o["Key"] for o in s3_env.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"])
    assert keys == [f"{prefix}/.rayquant-claim.json"]


def test_hub_lock_lives_on_a_side_branch_and_never_moves_the_output_branch(hub_env):
    uri = f"hf://rayquant-test/out-{uuid.uuid4().hex[:8]}"
    claim_output(uri, "fp-a", "claimer-1", stale_after_s=3600)
    repo = uri.removeprefix("hf://")
    main_head = resolve_hub_revision(repo, "main")
    with OutputLock(uri, "job-1", "fp-a", stale_after_s=0.6) as lock:
        time.sleep(0.5)  # at least one renewal commit on the side branch
        assert lock.renew()
        assert resolve_hub_revision(repo, "main") == main_head
        assert hub_env.repos[repo].refs.keys() == {"main", "rayquant-claim-main", "rayquant-lock-main"}

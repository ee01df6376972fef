"""`rayquant submit | status | logs | stop | list` against a real Ray head on 127.0.0.1 with token auth on.

One head per session (tests/jobs/conftest.py) and two tiny jobs per module, side by side (one worker
each on the head's 2 CPUs): one runs to its finished output, submitted twice; the other is stopped after
its first durable block and submitted again, which resumes it. The CLI runs in this process (`main`)
with the head's token in RAY_AUTH_TOKEN and nothing in RAY_ADDRESS.
"""

from __future__ import annotations

import contextlib
import io
import json
import shlex
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from rayquant.jobs.cli import build_parser
from rayquant.jobs.cli import main as rayquant
from rayquant.jobs.job_client import NoClusterAddress, cluster_address, cluster_token, jobs_api_url
from rayquant.jobs.job_status import JobStatusView
from rayquant.jobs.progress import STATUS_FILE, JobProgress
from rayquant.jobs.spec import SpecError, load_spec
from rayquant.jobs.submission import entrypoint, spec_for_cluster
from tests.ray_head import RayHead, free_port

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "specs" / "tiny-llama.yaml"
JOB_TIMEOUT_S = 240


@dataclass(frozen=True)
class CliRun:
    code: int
    out: str
    err: str
    seconds: float


def cli(env: dict[str, str], *args: str) -> CliRun:
    """`rayquant ARGS` in this process with `env` set and RAY_ADDRESS unset; its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    t = time.monotonic()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        mp.delenv("RAY_ADDRESS", raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        code = rayquant(list(args))
    return CliRun(code, out.getvalue(), err.getvalue(), time.monotonic() - t)


def ok(run: CliRun) -> CliRun:
    assert run.code == 0, run.err[-3000:]
    return run


@dataclass(frozen=True)
class Jobs:
    """What the module's two jobs did, for the tests to check."""

    done_id: str
    done_again: CliRun  # the same spec submitted a second time while it ran
    done_logs: CliRun  # `logs --follow` of it, returned when it ended
    done_status: dict
    done_out: Path
    stopped_id: str
    stopped_at: dict  # its status just before `stop`
    stopped_parent: str  # the name of its `rayquant quantize` process's parent, while it ran
    stop: CliRun
    stopped_status: dict
    resumed: CliRun  # the stopped job's spec submitted again
    resumed_logs: CliRun
    resumed_status: dict
    listed: list[dict]


def _submit(env: dict, head: RayHead, out: Path, *sets: str) -> CliRun:
    args = ["--set", "cluster.num_workers=1", "--set", f"output.uri={out}", "--set", "output.shared=true", *sets]
    return ok(cli(env, "submit", str(TINY), "--address", head.address, *args))


def _status(env: dict, head: RayHead, job_id: str) -> dict:
    return json.loads(ok(cli(env, "status", "--address", head.address, "--json", job_id)).out)


def _wait_for_a_durable_block(env: dict, head: RayHead, job_id: str) -> dict:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        status = _status(env, head, job_id)
        if (status["blocks_done"] or 0) >= 1 or status["ray_status"] not in ("PENDING", "RUNNING"):
            return status
        time.sleep(0.3)
    raise AssertionError(f"{job_id} reached no block in {JOB_TIMEOUT_S} s: {status}")


@pytest.fixture(scope="module")
def jobs(ray_head: RayHead, tmp_path_factory) -> Jobs:
    env = ray_head.env()
    done_out, stopped_out = tmp_path_factory.mktemp("submitted") / "out", tmp_path_factory.mktemp("stopped") / "out"
    done_id = _submit(env, ray_head, done_out).out.strip()
    done_again = _submit(env, ray_head, done_out)
    # more windows: its blocks take long enough to be stopped between the first and the last
    slow = ("--set", "name=tiny-stopped", "--set", "calibration.n_samples=96")
    stopped_id = _submit(env, ray_head, stopped_out, *slow).out.strip()
    stopped_at = _wait_for_a_durable_block(env, ray_head, stopped_id)
    stopped_parent = _parent_of_quantize("tiny-stopped")
    stop = ok(cli(env, "stop", "--address", ray_head.address, stopped_id))
    stopped_status = _status(env, ray_head, stopped_id)
    done_logs = ok(cli(env, "logs", "--address", ray_head.address, "--follow", done_id))
    done_status = _status(env, ray_head, done_id)
    resumed = _submit(env, ray_head, stopped_out, *slow)
    resumed_id = resumed.out.strip()
    resumed_logs = ok(cli(env, "logs", "--address", ray_head.address, "--follow", resumed_id))
    resumed_status = _status(env, ray_head, resumed_id)
    listed = json.loads(ok(cli(env, "list", "--address", ray_head.address, "--json")).out)
    return Jobs(done_id=done_id, done_again=done_again, done_logs=done_logs, done_status=done_status,
                done_out=done_out, stopped_id=stopped_id, stopped_at=stopped_at, stopped_parent=stopped_parent, stop=stop,
                stopped_status=stopped_status, resumed=resumed, resumed_logs=resumed_logs,
                resumed_status=resumed_status, listed=listed)


def _parent_of_quantize(name: str) -> str:
    """The process name of the parent of the `rayquant quantize` process running the job named `name`."""
    for proc in psutil.process_iter(["cmdline"]):
        argv = proc.info["cmdline"] or []
        if "quantize" in argv and f'name="{name}"' in argv:
            return proc.parent().name()
    raise AssertionError(f"no rayquant quantize process runs the job {name}")


def _events(logs: str) -> dict[str, dict]:
    """The job's JSON log lines by event name (the last of each)."""
    events = {}
    for line in logs.splitlines():
        if line.startswith("{"):
            event = json.loads(line)
            events[event.get("event")] = event
    return events


def test_submitted_job_runs_quantize_to_a_finished_output(jobs: Jobs):
    assert jobs.done_id.startswith("rq-") and len(jobs.done_id) == 19
    assert "job_done" in _events(jobs.done_logs.out)  # --follow returned after the job's last line
    manifest = json.loads((jobs.done_out / "rayquant-manifest.json").read_text())
    assert manifest["n_blocks"] == 4
    assert jobs.done_id == f"rq-{manifest['job_fingerprint'][:16]}"
    assert not (jobs.done_out / ".rayquant-staging").exists()


def test_status_of_a_finished_job_shows_every_block_and_the_output(jobs: Jobs, ray_head: RayHead):
    text = ok(cli(ray_head.env(), "status", "--address", ray_head.address, jobs.done_id)).out.splitlines()
    assert {"ray status: SUCCEEDED", "blocks: 4/4", f"output: {jobs.done_out}"} <= set(text)
    status = jobs.done_status
    assert (status["ray_status"], status["blocks_done"], status["n_blocks"], status["stage"]) == ("SUCCEEDED", 4, 4,
                                                                                                 "done")
    assert status["output"] == str(jobs.done_out)
    assert status["spec"] == "tiny-llama-w4g128"


def test_submitting_the_same_spec_twice_gives_one_job(jobs: Jobs):
    assert jobs.done_again.out.strip() == jobs.done_id
    assert "already submitted" in jobs.done_again.err and jobs.done_again.err.count("\n") == 1
    assert [j["job_id"] for j in jobs.listed].count(jobs.done_id) == 1


def test_status_of_a_running_job_comes_from_its_progress_record(jobs: Jobs):
    at = jobs.stopped_at
    assert at["ray_status"] == "RUNNING" and at["progress_from"] == "status.json", at
    assert 1 <= at["blocks_done"] < at["n_blocks"] == 4
    assert at["seconds_per_block"] > 0 and at["eta_s"] > 0
    assert at["stage"] in ("load", "plan", "collect", "reduce", "solve", "baseline", "validate", "share", "advance",
                           "eval", "handoff")


def test_the_job_s_process_is_ray_s_own_child_not_a_shell_s(jobs: Jobs):
    # a stop signals the processes Ray finds at that moment: a shell in between could be signalled before
    # it forked rayquant, which then ran the job to its end as an orphan
    assert jobs.stopped_parent not in ("sh", "dash", "bash")


def test_stopped_job_is_stopped_and_resumes_when_submitted_again(jobs: Jobs):
    assert jobs.stop.out.strip() == f"{jobs.stopped_id}: STOPPED"
    assert jobs.stopped_status["ray_status"] == "STOPPED"
    assert jobs.stopped_status["blocks_done"] >= jobs.stopped_at["blocks_done"]
    resumed_id = jobs.resumed.out.strip()
    assert resumed_id == f"{jobs.stopped_id}-2"
    planned = _events(jobs.resumed_logs.out)["job_planned"]
    assert planned["resume_from"] >= jobs.stopped_at["blocks_done"]
    assert (jobs.resumed_status["ray_status"], jobs.resumed_status["blocks_done"]) == ("SUCCEEDED", 4)


def test_list_shows_running_and_finished_jobs_with_their_spec_and_output(jobs: Jobs):
    by_id = {j["job_id"]: j for j in jobs.listed}
    assert by_id[jobs.done_id]["status"] == "SUCCEEDED"
    assert by_id[jobs.done_id]["output"] == str(jobs.done_out)
    assert by_id[jobs.stopped_id]["status"] == "STOPPED"
    assert by_id[f"{jobs.stopped_id}-2"]["spec"] == "tiny-stopped"


def test_wrong_token_is_one_line_and_exit_2(ray_head: RayHead):
    run = cli({"RAY_AUTH_TOKEN": "not-the-token"}, "list", "--address", ray_head.address)
    assert run.code == 2
    assert run.err.count("\n") == 1 and run.err.startswith("error: ClusterAuthFailed:"), run.err
    assert "refused the token from RAY_AUTH_TOKEN" in run.err and "not-the-token" not in run.err
    assert run.seconds < 10


def test_unreachable_address_fails_within_10_s_naming_it(ray_head: RayHead):
    for address in (f"http://127.0.0.1:{free_port()}", "http://192.0.2.1:8265"):  # closed port; TEST-NET-1
        run = cli(ray_head.env(), "status", "--address", address, "rq-0")
        assert run.code == 2 and run.err.startswith("error: ClusterUnreachable:"), run.err
        assert address in run.err and run.err.count("\n") == 1
        assert run.seconds < 10


def test_unknown_job_id_is_exit_2(ray_head: RayHead):
    for command in ("status", "logs", "stop"):
        run = cli(ray_head.env(), command, "--address", ray_head.address, "rq-doesnotexist")
        assert run.code == 2, (command, run.err)
        assert run.err.startswith("error: JobNotFound:") and "`rayquant list`" in run.err


# without a cluster


def test_address_comes_from_the_flag_then_the_spec_then_ray_address():
    env = {"RAY_ADDRESS": "http://env:8265"}
    assert cluster_address("http://flag:1", "http://spec:2", env).url == "http://flag:1"
    assert cluster_address(None, "ray://spec:10001", env).url == "http://spec:8265"
    assert cluster_address(None, None, env).named_by == "RAY_ADDRESS"
    assert cluster_address(None, "auto", env).named_by == "RAY_ADDRESS"
    assert jobs_api_url("10.0.0.5:6379") == "http://10.0.0.5:8265"
    with pytest.raises(NoClusterAddress, match="--address"):
        cluster_address(None, None, {})


def test_token_is_read_where_ray_reads_it(tmp_path: Path):
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    (tmp_path / "t").write_text("from-path")
    assert cluster_token({"RAY_AUTH_TOKEN": "from-env"}, tmp_path).value == "from-env"
    assert cluster_token({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "t")}, tmp_path).value == "from-path"
    assert cluster_token({}, tmp_path).value == "from-home"
    assert cluster_token({}, tmp_path / "nobody") is None


def test_entrypoint_is_quantize_with_the_whole_resolved_spec(tmp_path: Path):
    spec = spec_for_cluster(load_spec(TINY, ["output.shared=true", "output.uri=rel/out"]), tmp_path)
    argv = shlex.split(entrypoint(spec))
    assert argv[:3] == ["exec", "rayquant", "quantize"]
    args = build_parser().parse_args(argv[2:])
    shipped = load_spec(None, args.set)
    assert shipped == spec
    assert (shipped.cluster.address, shipped.output.uri) == ("auto", str(tmp_path / "rel" / "out"))


def test_submit_refuses_a_local_output_the_cluster_may_not_see(tmp_path: Path):
    with pytest.raises(SpecError, match="output.shared: true"):
        spec_for_cluster(load_spec(TINY), tmp_path)


def test_progress_record_tracks_blocks_stage_and_eta(tmp_path: Path):
    progress = JobProgress("tiny", n_blocks=4, first_block=1, terminal=False, status_dir=tmp_path)
    read = lambda: json.loads((tmp_path / STATUS_FILE).read_text())
    assert (read()["blocks_done"], read()["block"], read()["stage"], read()["eta_s"]) == (1, 1, "starting", None)
    assert progress.shows_stages  # the driver polls rank 0's stage for the record even off a terminal
    progress.stage(1, "solve")
    assert (read()["block"], read()["stage"]) == (1, "solve")
    progress.block_done(1, 2.0, replayed=False)
    record = read()
    assert (record["blocks_done"], record["block"], record["seconds_per_block"], record["eta_s"]) == (2, 2, 2.0, 4.0)
    progress.block_done(2, 1.0, replayed=False)
    progress.block_done(3, 3.0, replayed=False)
    assert (read()["blocks_done"], read()["block"], read()["stage"], read()["eta_s"]) == (4, None, "finishing", 0.0)
    assert [p.name for p in tmp_path.iterdir()] == [STATUS_FILE]  # replaced atomically: no temporary left


def test_status_lines_name_blocks_stage_eta_and_output():
    view = JobStatusView(job_id="rq-1", ray_status="RUNNING", spec="tiny", output="/out", progress_from="status.json",
                         blocks_done=2, n_blocks=4, block=2, stage="solve", seconds_per_block=1.5, eta_s=3.0)
    assert view.lines() == ["job: rq-1", "ray status: RUNNING", "spec: tiny", "blocks: 2/4", "stage: solve (block 2)",
                            "seconds per block: 1.5", "eta (s): 3.0", "output: /out"]

"""The job service end to end on the session's real Ray head (127.0.0.1, token auth on, tests/jobs/conftest.py):
`rayquant reconcile` submitting through the Jobs API while a watched source's revision changes, two different
jobs at once on the head against the same jobs run alone, and the jobs' Ray metrics read back from the head's
Prometheus endpoint.

Every job is small (8 calibration windows of 128 tokens, one worker: the head's 2 CPUs hold two jobs at once).
The reconcile rounds run one after another, each job waited for; the two jobs run alone (`rayquant quantize` in
the foreground, each on its own embedded Ray) start in the background with the module and are done by the time
the jobs at once need them. The metrics tests read the jobs at once: one publishes to the S3 server (whose
credentials the head's processes have), so bytes uploaded has a value.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from ray.job_submission import JobSubmissionClient
from safetensors.torch import load_file, save_file

from rayquant.jobs.api import submit
from rayquant.storage.model_source import open_model_source
from rayquant.storage.output_claims import HeldBy, read_claim
from rayquant.storage.output_layout import MANIFEST_FILE, RUN_STATS_FILE
from tests.ray_head import RayHead

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "jobs" / "specs" / "tiny-llama.yaml"
JOB_TIMEOUT_S = 240
SMALL = ("calibration.n_samples=8", "calibration.seq_len=128", "calibration.eval_samples=2", "cluster.num_workers=1")
BUCKET = "service-e2e"


def rayquant(head: RayHead, *args: str) -> subprocess.Popen:
    """`rayquant ARGS` started as a user starts it, with the head's token and no RAY_ADDRESS."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | head.env()
    return subprocess.Popen([sys.executable, "-m", "rayquant.jobs.cli", *args], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finished(proc: subprocess.Popen, timeout: float = 300) -> str:
    """The stdout of a `rayquant` process that exited 0."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


def jobs_client(head: RayHead) -> JobSubmissionClient:
    return JobSubmissionClient(head.address, headers={"Authorization": f"Bearer {head.token}"})


def wait_ended(client: JobSubmissionClient, job_id: str) -> str:
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := str(client.get_job_status(job_id))) in ("PENDING", "RUNNING"):
        assert time.monotonic() < deadline, f"{job_id} still {status} after {JOB_TIMEOUT_S} s"
        time.sleep(0.5)
    return status


# --- reconcile through the Jobs API


@dataclass(frozen=True)
class Pair:
    """One line of `rayquant reconcile`: a (source, recipe) pair and what was done about it."""

    revision12: str
    output: str
    decision: str
    reason: str


def pairs(stdout: str) -> list[Pair]:
    lines = [line.split("\t") for line in stdout.splitlines() if line.strip()]
    return [Pair(revision12=f[1], output=f[3], decision=f[4], reason=f[5]) for f in lines]


@dataclass(frozen=True)
class Round:
    pairs: list[Pair]
    jobs: dict[str, dict]  # the cluster's jobs of this schedule after the round: job id -> metadata


@dataclass(frozen=True)
class Reconciled:
    revisions: list[str]  # the source's revision, then after its change
    first: Round  # the source at revisions[0]
    unchanged: Round  # again, nothing changed, its job finished
    racing: list[Round]  # two reconcilers started together after the change
    racing_pids: list[int]
    claims: dict[str, HeldBy]  # output -> its claim, at the end
    manifests: dict[str, dict]  # output -> its finished manifest, at the end
    statuses: dict[str, str]  # job id -> Ray's final status


def new_revision(model: Path) -> str:
    """Rewrite the model's first shard with its weights nudged (the same header: a fine-tune saved again);
    returns the source's new revision (storage/model_source.py hashes sampled weight bytes too)."""
    shard = sorted(model.glob("*.safetensors"))[0]
    tensors = {name: t * 1.01 for name, t in load_file(shard).items()}
    save_file(tensors, shard, metadata={"format": "pt"})
    return open_model_source(str(model)).revision


@pytest.fixture(scope="module")
def reconciled(ray_head: RayHead, tmp_path_factory) -> Reconciled:
    """Four `rayquant reconcile` runs: the first submits the source's job; once that finished, the second finds
    nothing new; after the source's revision changed, two started together (the run after a change) submit its
    one new job. Both jobs are waited for."""
    root = tmp_path_factory.mktemp("reconcile-e2e")
    model = root / "llama-watched"
    shutil.copytree(open_model_source("synthetic://llama-tiny").path, model)
    recipe = {"name": "w4g64", "output": str(root / "outputs" / "{name}-{revision12}-{recipe}"),
              "spec": {"quant": {"bits": 4, "group_size": 64}, "cluster": {"num_workers": 1},
                       "calibration": {"n_samples": 8, "seq_len": 128, "eval_samples": 0}, "output": {"shared": True}}}
    schedule = root / "schedule.yaml"
    schedule.write_text(yaml.safe_dump({"sources": [{"uri": str(model)}], "recipes": [recipe]}))
    client = jobs_client(ray_head)
    ours = lambda: {j.submission_id: j.metadata for j in client.list_jobs()
                    if (j.metadata or {}).get("rayquant_output", "").startswith(str(root))}
    reconcile = lambda: rayquant(ray_head, "reconcile", str(schedule), "--address", ray_head.address)

    def reconcile_round(*procs: subprocess.Popen) -> list[Round]:
        outs = [finished(p) for p in procs]
        return [Round(pairs(out), ours()) for out in outs]

    def wait_all() -> dict[str, str]:
        return {job_id: wait_ended(client, job_id) for job_id in ours()}

    revisions = [open_model_source(str(model)).revision]
    first = reconcile_round(reconcile())[0]
    wait_all()
    unchanged = reconcile_round(reconcile())[0]
    revisions.append(new_revision(model))
    procs = [reconcile(), reconcile()]
    racing = reconcile_round(*procs)
    statuses = wait_all()
    outputs = {m["rayquant_output"] for m in ours().values()}
    return Reconciled(revisions=revisions, first=first, unchanged=unchanged, racing=racing,
                      racing_pids=[p.pid for p in procs], claims={out: read_claim(out) for out in outputs},
                      manifests={out: json.loads((Path(out) / MANIFEST_FILE).read_text()) for out in outputs},
                      statuses=statuses)


def test_reconcile_submits_the_watched_source_through_the_jobs_api(reconciled: Reconciled):
    (pair,) = reconciled.first.pairs
    assert (pair.decision, pair.revision12) == ("submitted", reconciled.revisions[0][:12])
    (job_id, metadata), = reconciled.first.jobs.items()
    assert metadata["rayquant_output"] == pair.output and f"job {job_id}" in pair.reason
    assert reconciled.statuses[job_id] == "SUCCEEDED"
    manifest = reconciled.manifests[pair.output]
    # the job computed the revision and fingerprint the reconciler claimed the output for
    assert manifest["source_revision"] == reconciled.revisions[0]
    assert manifest["job_fingerprint"] == metadata["rayquant_fingerprint"] == reconciled.claims[pair.output].fingerprint
    assert job_id == f"rq-{manifest['job_fingerprint'][:16]}"


def test_reconcile_with_nothing_new_submits_nothing(reconciled: Reconciled):
    (again,) = reconciled.unchanged.pairs  # its job finished: the output's manifest says so
    assert (again.decision, again.output) == ("up-to-date", reconciled.first.pairs[0].output)
    assert reconciled.unchanged.jobs == reconciled.first.jobs


def test_a_new_revision_gets_exactly_one_job_from_two_reconcilers_at_once(reconciled: Reconciled):
    decisions = sorted(r.pairs[0].decision for r in reconciled.racing)
    assert decisions in (["claimed", "submitted"], ["submitted", "up-to-date"]), decisions
    (winner,) = [i for i, r in enumerate(reconciled.racing) if r.pairs[0].decision == "submitted"]
    output = reconciled.racing[winner].pairs[0].output
    assert {(r.pairs[0].output, r.pairs[0].revision12) for r in reconciled.racing} == {
        (output, reconciled.revisions[1][:12])}
    assert output != reconciled.first.pairs[0].output
    final = reconciled.racing[1 - winner].jobs | reconciled.racing[winner].jobs
    new = [job_id for job_id in final if job_id not in reconciled.first.jobs]
    assert len(final) == 2 and len(new) == 1, final
    assert final[new[0]]["rayquant_output"] == output and reconciled.statuses[new[0]] == "SUCCEEDED"
    assert reconciled.manifests[output]["source_revision"] == reconciled.revisions[1]
    claim = reconciled.claims[output]  # the winner's, written before it submitted
    assert claim.holder.startswith("reconcile@") and f":{reconciled.racing_pids[winner]}:" in claim.holder
    assert claim.fingerprint == final[new[0]]["rayquant_fingerprint"] == reconciled.manifests[output]["job_fingerprint"]


# --- two different jobs at once on the head, and the same jobs alone


@dataclass(frozen=True)
class Job:
    name: str
    sets: tuple[str, ...]  # what the job alone and the job on the head share: its identity


JOBS = (Job("svc-w4", ("name=svc-w4", *SMALL)), Job("svc-w8", ("name=svc-w8", "quant.bits=8", *SMALL)))


def quantize_alone(job: Job, out: Path) -> Path:
    """`rayquant quantize` in the foreground: the job alone on an embedded Ray of its own."""
    proc = subprocess.run([sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(TINY),
                           *(a for s in (*job.sets, f"output.uri={out}") for a in ("--set", s))],
                          capture_output=True, text=True, timeout=600, cwd=REPO,
                          env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module", autouse=True)
def alone_in_background(request, tmp_path_factory) -> Iterator[dict[str, Future[Path]]]:
    """With the module's first test, the jobs alone, one after the other beside the reconcile tests, if a
    selected test needs them."""
    if not any("at_once" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield {}
        return
    outs = {job.name: tmp_path_factory.mktemp(f"alone-{job.name}") / "out" for job in JOBS}
    with ThreadPoolExecutor(1, thread_name_prefix="alone") as pool:
        runs = {job.name: pool.submit(quantize_alone, job, outs[job.name]) for job in JOBS}
        yield runs
        for run in runs.values():
            run.cancel()


@dataclass(frozen=True)
class AtOnce:
    outputs: dict[str, Path]  # job name -> its output (svc-w8's downloaded from S3)
    logs: dict[str, list[dict]]  # job name -> its JSON log lines
    alone: dict[str, Path]  # job name -> the output of the job alone


def download(server, uri: str, folder: Path) -> Path:
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    client = server.client()
    for obj in client.list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/").get("Contents", []):
        target = folder / obj["Key"].removeprefix(f"{prefix}/")
        target.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(bucket, obj["Key"], str(target))
    return folder


@pytest.fixture(scope="module")
def at_once(ray_head: RayHead, s3_server, alone_in_background, tmp_path_factory) -> AtOnce:
    """svc-w4 into a shared folder and svc-w8 to S3 (built in a shared work_dir), submitted together."""
    root = tmp_path_factory.mktemp("at-once")
    s3_uri = f"s3://{s3_server.create_bucket(BUCKET)}/{root.name}/svc-w8"
    outs = {"svc-w4": (f"output.uri={root / 'svc-w4'}",),
            "svc-w8": (f"output.uri={s3_uri}", f"output.work_dir={root / 'work'}")}
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("RAY_ADDRESS", raising=False)
        mp.setenv("RAY_AUTH_TOKEN", ray_head.token)
        handles = {job.name: submit(TINY, set=[*job.sets, *outs[job.name], "output.shared=true"],
                                    address=ray_head.address) for job in JOBS}
        for handle in handles.values():
            handle.wait(timeout_s=JOB_TIMEOUT_S, poll_s=0.5)
        logs = {name: [json.loads(line) for line in h.logs().splitlines() if line.startswith("{")]
                for name, h in handles.items()}
    outputs = {"svc-w4": root / "svc-w4", "svc-w8": download(s3_server, s3_uri, root / "svc-w8-s3")}
    return AtOnce(outputs=outputs, logs=logs,
                  alone={name: run.result() for name, run in alone_in_background.items()})


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_different_jobs_ran_at_once_on_the_head(at_once: AtOnce):
    spans = {}
    for name, lines in at_once.logs.items():
        stamps = [line["timestamp"] for line in lines]
        assert lines[-1]["event"] == "job_done", lines[-1]
        spans[name] = (min(stamps), max(stamps))
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, spans  # each started before the other ended
    manifests = [json.loads((out / MANIFEST_FILE).read_text()) for out in at_once.outputs.values()]
    assert manifests[0]["job_fingerprint"] != manifests[1]["job_fingerprint"]
    assert [m["resolved_spec"]["quant"]["bits"] for m in manifests] == [4, 8]


@pytest.mark.parametrize("name", [job.name for job in JOBS])
def test_jobs_at_once_write_the_same_files_as_alone(at_once: AtOnce, name: str):
    """Byte for byte: shards, index, config, manifest, report, card; run-stats.json holds timings (and the
    S3 output has none). The jobs alone ran in the foreground: equal files also show that `rayquant quantize`
    and a submitted job write the same bytes."""
    together, alone = files_of(at_once.outputs[name]), files_of(at_once.alone[name])
    blocks = list(range(json.loads(alone[MANIFEST_FILE])["n_blocks"]))
    stats = json.loads(alone.pop(RUN_STATS_FILE))
    assert stats["workers"] == 1 and [b["block"] for b in stats["blocks"]] == blocks
    if RUN_STATS_FILE in together:
        assert [b["block"] for b in json.loads(together.pop(RUN_STATS_FILE))["blocks"]] == blocks
    assert sorted(together) == sorted(alone)
    assert {"config.json", "model.safetensors.index.json", MANIFEST_FILE} <= set(alone)
    assert any(path.endswith(".safetensors") for path in alone)
    differing = [path for path in alone if together[path] != alone[path]]
    assert differing == []


# --- the jobs' Ray metrics, from the head's Prometheus endpoint

_SAMPLE = re.compile(r"^(\w+)\{(.*)\} (\S+)$")
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def scrape(head: RayHead) -> list[tuple[str, dict[str, str], float]]:
    """The node's metrics as (name, labels, value)."""
    text = requests.get(f"http://127.0.0.1:{head.metrics_port}/metrics", timeout=5).text
    return [(m[1], dict(_LABEL.findall(m[2])), float(m[3])) for m in map(_SAMPLE.match, text.splitlines()) if m]


def metric(samples, name: str, job: str, **labels: str) -> list[float]:
    return [v for n, tags, v in samples if n == name and tags.get("job") == job
            and all(tags.get(k) == x for k, x in labels.items())]


@pytest.fixture(scope="module")
def exported(ray_head: RayHead, at_once: AtOnce) -> list[tuple[str, dict[str, str], float]]:
    """The scrape once both jobs' last metrics arrived (the metrics agent exports every few seconds)."""
    deadline = time.monotonic() + 60
    while True:
        samples = scrape(ray_head)
        if (all(metric(samples, "ray_rayquant_blocks_done_total", job.name) for job in JOBS)
                and metric(samples, "ray_rayquant_bytes_uploaded_total", "svc-w8")) or time.monotonic() > deadline:
            return samples
        time.sleep(1)


@pytest.mark.parametrize("name", [job.name for job in JOBS])
def test_metrics_show_each_jobs_blocks_stages_and_eta(exported, at_once: AtOnce, name: str):
    n_blocks = json.loads((at_once.outputs[name] / MANIFEST_FILE).read_text())["n_blocks"]
    assert metric(exported, "ray_rayquant_blocks_done_total", name) == [n_blocks]
    assert metric(exported, "ray_rayquant_eta_seconds", name) == [0.0]  # after the last block
    last_block = [line for line in at_once.logs[name] if line["event"] == "block_done"][-1]
    assert last_block["progress"] == f"{n_blocks}/{n_blocks}"
    for stage, seconds in last_block["stages"].items():
        assert metric(exported, "ray_rayquant_stage_seconds", name, stage=stage) == [seconds], stage


def test_metrics_show_the_bytes_uploaded_to_s3(exported, at_once: AtOnce):
    shards = sum(p.stat().st_size for p in at_once.outputs["svc-w8"].glob("*.safetensors"))
    assert metric(exported, "ray_rayquant_bytes_uploaded_total", "svc-w8") == [shards]
    assert metric(exported, "ray_rayquant_bytes_uploaded_total", "svc-w4") == []  # a local output uploads nothing

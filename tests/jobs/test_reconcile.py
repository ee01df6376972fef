"""`rayquant reconcile`: a schedule of one local and one S3 source (the real S3 server) × two recipes, with a
submission function that records the specs it is given (the seam where the Ray Jobs API goes)."""

from __future__ import annotations

import json
import shutil
import threading
import uuid
from argparse import Namespace
from pathlib import Path

import pytest
import yaml
from rayquant.jobs.reconcile import (
    CLAIMED,
    CONFLICT,
    SUBMITTED,
    UP_TO_DATE,
    WOULD_SUBMIT,
    decide,
    reconcile,
    run_reconcile,
)
from rayquant.jobs.schedule import ScheduleError, load_schedule
from rayquant.jobs.spec import JobSpec
from rayquant.storage.model_source import open_model_source
from rayquant.storage.output_claims import HeldBy, read_claim

BUCKET = "reconcile-test"


class RecordedSubmissions:
    """A submit function: records each spec, returns a job id, starts nothing."""

    def __init__(self) -> None:
        self.specs: list[JobSpec] = []
        self._lock = threading.Lock()

    def __call__(self, spec: JobSpec) -> str:
        with self._lock:
            self.specs.append(spec)
            return f"job-{len(self.specs)}"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """synthetic://llama-tiny copied into a directory of its own (two shards, config, tokenizer)."""
    target = tmp_path_factory.mktemp("models") / "llama-local"
    shutil.copytree(open_model_source("synthetic://llama-tiny").path, target)
    return target


def upload_dir(server, folder: Path, prefix: str) -> str:
    server.create_bucket(BUCKET)
    client = server.client()
    for path in folder.iterdir():
        client.upload_file(str(path), BUCKET, f"{prefix}/{path.name}")
    return f"s3://{BUCKET}/{prefix}"


def write_schedule(folder: Path, sources: list[dict], recipes: list[dict]) -> Path:
    path = folder / "schedule.yaml"
    path.write_text(yaml.safe_dump({"sources": sources, "recipes": recipes}))
    return path


@pytest.fixture
def schedule_path(tmp_path, model_dir, s3_env) -> Path:
    """One local and one S3 source (fresh prefix), recipes writing to a local folder and to S3."""
    s3_uri = upload_dir(s3_env, model_dir, f"src-{uuid.uuid4().hex[:8]}")
    out = f"out-{uuid.uuid4().hex[:8]}"
    recipes = [
        {"name": "w4g128", "spec": {"quant": {"bits": 4, "group_size": 128}, "cluster": {"num_workers": 1}},
         "output": str(tmp_path / "outputs" / "{name}-{revision12}-{recipe}")},
        {"name": "w8", "spec": {"quant": {"bits": 8}, "calibration": {"n_samples": 8}},
         "output": f"s3://{BUCKET}/{out}/{{name}}-{{revision12}}-{{recipe}}"},
    ]
    return write_schedule(tmp_path, [{"uri": str(model_dir)}, {"uri": s3_uri, "name": "llama-s3"}], recipes)


def finish(spec: JobSpec, fingerprint: str, s3_server) -> None:
    """What a finished job leaves: the manifest, last, at its output."""
    body = json.dumps({"job_fingerprint": fingerprint, "files": []})
    if spec.output.uri.startswith("s3://"):
        bucket, _, prefix = spec.output.uri.removeprefix("s3://").partition("/")
        s3_server.client().put_object(Bucket=bucket, Key=f"{prefix}/rayquant-manifest.json", Body=body.encode())
    else:
        Path(spec.output.uri).mkdir(parents=True, exist_ok=True)
        (Path(spec.output.uri) / "rayquant-manifest.json").write_text(body)


def test_reconcile_submits_each_pair_once_and_only_the_changed_source_again(schedule_path, s3_env):
    schedule = load_schedule(schedule_path)
    submitted = RecordedSubmissions()
    first = reconcile(schedule, submitted)
    assert [o.decision for o in first] == [SUBMITTED] * 4
    assert len({s.output.uri for s in submitted.specs}) == 4
    # the fingerprint the reconciler claimed for is the one the job computes when it opens its source
    fingerprints = {}
    for outcome, spec in zip(first, submitted.specs, strict=True):
        revision = open_model_source(spec.model.source).revision
        assert outcome.revision == revision and revision[:12] in spec.output.uri
        fingerprints[spec.output.uri] = spec.fingerprint(revision)
        assert read_claim(spec.output.uri).fingerprint == fingerprints[spec.output.uri]
    assert [o.decision for o in reconcile(schedule, submitted)] == [CLAIMED] * 4  # not finished yet
    assert len(submitted.specs) == 4
    for spec in submitted.specs:
        finish(spec, fingerprints[spec.output.uri], s3_env)
    assert [o.decision for o in reconcile(schedule, submitted)] == [UP_TO_DATE] * 4

    s3_source = schedule.sources[1].uri
    config = json.loads((Path(schedule.sources[0].uri) / "config.json").read_text()) | {"rope_theta": 12345.0}
    bucket, _, prefix = s3_source.removeprefix("s3://").partition("/")
    s3_env.client().put_object(Bucket=bucket, Key=f"{prefix}/config.json", Body=json.dumps(config).encode())
    third = reconcile(schedule, submitted)
    assert [(o.source, o.decision) for o in third] == [
        (schedule.sources[0].uri, UP_TO_DATE), (schedule.sources[0].uri, UP_TO_DATE),
        (s3_source, SUBMITTED), (s3_source, SUBMITTED)]
    new = submitted.specs[4:]
    assert len(new) == 2 and all(spec.model.source == s3_source for spec in new)
    assert third[2].revision == open_model_source(s3_source).revision != first[2].revision


def test_two_reconcilers_at_once_submit_each_pair_once(schedule_path, s3_env):
    schedule = load_schedule(schedule_path)
    submitted = RecordedSubmissions()
    barrier = threading.Barrier(2)
    outcomes: list[list] = [[], []]

    def run(i: int) -> None:
        barrier.wait()
        outcomes[i] = reconcile(schedule, submitted, claimer=f"reconciler-{i}")

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s.output.uri for s in submitted.specs) == sorted({o.output for o in outcomes[0]})
    assert len(submitted.specs) == 4
    for a, b in zip(*outcomes, strict=True):
        assert sorted([a.decision, b.decision]) == [CLAIMED, SUBMITTED]


def printed_pairs(capsys) -> list[str]:
    """The command's tab-separated pair lines (structlog, unconfigured in tests, prints to stdout too)."""
    return [line for line in capsys.readouterr().out.splitlines() if line.count("\t") == 5]


def test_dry_run_submits_and_claims_nothing_and_prints_one_line_per_pair(schedule_path, s3_env, capsys):
    code = run_reconcile(Namespace(schedule=str(schedule_path), dry_run=True, address=None))
    lines = printed_pairs(capsys)
    assert code == 0 and len(lines) == 4
    for line in lines:
        _, revision, recipe, output, decision, reason = line.split("\t")
        assert (decision, reason) == (WOULD_SUBMIT, "no finished output and no claim")
        assert len(revision) == 12 and revision in output and recipe in output
        assert read_claim(output) is None
    schedule = load_schedule(schedule_path)
    reconcile(schedule, RecordedSubmissions())
    run_reconcile(Namespace(schedule=str(schedule_path), dry_run=True, address=None))
    assert [line.split("\t")[4] for line in printed_pairs(capsys)] == [CLAIMED] * 4


def test_output_holding_another_jobs_checkpoint_is_a_conflict_not_a_submission(tmp_path, model_dir, capsys):
    recipe = {"name": "w4", "output": str(tmp_path / "out" / "{name}")}  # no revision: one output for all
    path = write_schedule(tmp_path, [{"uri": str(model_dir)}], [recipe])
    (tmp_path / "out" / model_dir.name).mkdir(parents=True)
    (tmp_path / "out" / model_dir.name / "rayquant-manifest.json").write_text('{"job_fingerprint": "beef"}')
    submitted = RecordedSubmissions()
    [outcome] = reconcile(load_schedule(path), submitted)
    assert outcome.decision == CONFLICT and "{revision12}" in outcome.reason and not submitted.specs
    assert run_reconcile(Namespace(schedule=str(path), dry_run=True, address=None)) == 2


def test_two_sources_rendering_one_output_are_both_conflicts(tmp_path, model_dir):
    other = tmp_path / "other-model"
    shutil.copytree(model_dir, other)
    recipe = {"name": "w4", "output": str(tmp_path / "out" / "{recipe}")}
    path = write_schedule(tmp_path, [{"uri": str(model_dir)}, {"uri": str(other)}], [recipe])
    submitted = RecordedSubmissions()
    outcomes = reconcile(load_schedule(path), submitted)
    assert [o.decision for o in outcomes] == [CONFLICT, CONFLICT] and not submitted.specs
    assert "{name}" in outcomes[0].reason


def test_decide_orders_finished_then_claims():
    now = 1000.0
    claim = HeldBy(fingerprint="fp", holder="r1", time=now - 10, nonce="n")
    assert decide("fp", "fp", claim, now, 60).decision == UP_TO_DATE
    assert decide("fp", "other", None, now, 60).decision == CONFLICT
    assert decide("fp", None, claim, now, 60).decision == CLAIMED
    assert decide("fp", None, claim, now, 5).decision == WOULD_SUBMIT
    assert "older than claim_stale_after_s=5" in decide("fp", None, claim, now, 5).reason
    assert decide("fp2", None, claim, now, 5).decision == CONFLICT  # another job's claim, even stale


@pytest.mark.parametrize(("recipe", "names"), [
    ({"name": "w4", "spec": {"quant": {"bitz": 4}}, "output": "/tmp/x/{name}"},
     ["recipes[0] (w4).spec", "quant.bitz: unknown key"]),
    ({"name": "w4", "output": "/tmp/x/{name}-{revison}"}, ["recipes[0] (w4).output", "{revison}", "{revision12}"]),
    ({"name": "w4", "spec": {"model": {"source": "/m"}}, "output": "/tmp/x/{name}"},
     ["recipes[0] (w4).spec.model.source", "set by the schedule's sources"]),
    ({"name": "w4", "spec": {"quant": {"bits": 5}}, "output": "/tmp/x/{name}"}, ["quant.bits", "5"]),
    ({"name": "w4", "output": "ftp://x/{name}"}, ["output.uri", "s3://bucket"]),
    ({"name": "w4", "output": "/tmp/x/{name!r}"}, ["{name}", "may not carry"]),
])
def test_invalid_recipe_is_a_schedule_error_naming_the_field(tmp_path, recipe, names):
    path = write_schedule(tmp_path, [{"uri": "synthetic://llama-tiny"}], [recipe])
    with pytest.raises(ScheduleError) as err:
        load_schedule(path)
    for name in names:
        assert name in str(err.value)


def test_unknown_schedule_key_and_missing_file_are_schedule_errors(tmp_path):
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump({"sources": [{"uri": "synthetic://llama-tiny", "branch": "x"}],
                                    "recipes": [{"name": "a", "output": "/tmp/{name}"}]}))
    with pytest.raises(ScheduleError, match=r"sources\[0\]\.branch: unknown key"):
        load_schedule(path)
    with pytest.raises(ScheduleError, match="does not exist"):
        load_schedule(tmp_path / "missing.yaml")


def test_example_schedule_loads():
    schedule = load_schedule(Path(__file__).parents[2] / "jobs" / "specs" / "schedule-example.yaml")
    assert [r.name for r in schedule.recipes] == ["w4g128", "w8-act-order"] and len(schedule.sources) == 3

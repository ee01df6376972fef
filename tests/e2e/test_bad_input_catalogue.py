"""The bad-input catalogue (issue 17): one table of wrong inputs a user can give, each run through the real
`rayquant` command. Every case must exit 2 within its timeout, with one line on stderr naming the error type
and the fix, no traceback, and nothing published at its output (local folder, S3 prefix or Hub repo).

A case is a record: its id, a setup that builds the bad input in the case's folder, the CLI arguments
(`{tmp}`: that folder, `{out}`: the case's output), the error type, a fragment of the fix the message names,
and a timeout. Cases refused by the spec never import torch or start Ray (about 0.3 s each); the others
start an embedded Ray with one CPU worker (6-12 s each), so the cases run two at a time (CaseRunner): 155 s
for 43 cases on 2 shared cores against 278 s one at a time (2026-12-06). The S3, Hub and Ray-head servers start only for the cases
that use them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from rayquant.storage.model_source import open_model_source
from tests.ray_head import RayHead, free_port, run_ray_head

from .models import REPO, SPEC

SPEC_S = 20  # refused by the spec, before torch or Ray are imported
RAY_S = 120  # refused after the embedded Ray started (its start and shutdown: ~6-10 s on 2 idle cores)
CLUSTER_S = 30  # a Jobs API call that must fail, not wait
AT_ONCE = 2  # cases run side by side: a Ray case keeps about one core busy (measured: 1.2 cores for two)
BUCKET = "catalogue"
# the classic "billion laughs": ~430 bytes that expand to 10⁹ list items once copied
ALIAS_BOMB = "\n".join(["a: &a [x, x, x, x, x, x, x, x, x, x]"] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 10)}]" for i in range(8)]) + "\n"


@dataclass
class Inputs:
    """What a case's setup builds on: its folder, the servers (started on first use) and the CLI's environment."""

    tmp: Path
    request: pytest.FixtureRequest
    env: dict[str, str] = field(default_factory=dict)  # added to the CLI's environment
    output: str = ""  # where nothing may be published: the local output, s3://bucket/prefix or hf://org/name

    def server(self, name: str):
        return self.request.getfixturevalue(name)


@dataclass(frozen=True)
class Case:
    id: str
    setup: Callable[[Inputs], None] | None  # builds the bad input; may point Inputs.output at a remote target
    args: tuple[str, ...]  # after `rayquant`
    error: str  # the exception type named on the error line
    fix: str  # a fragment of what the message tells the user to do
    timeout_s: float


def quantize(*sets: str) -> tuple[str, ...]:
    """`quantize` of the tiny Llama spec into the case's output with one CPU worker, then `sets` (later ones win)."""
    base = ("output.uri={out}", "cluster.num_workers=1", *sets)
    return ("quantize", str(SPEC), *(a for s in base for a in ("--set", s)))


# --- setups: each builds one bad input under inputs.tmp


def _spec_file(text: str | bytes) -> Callable[[Inputs], None]:
    def setup(inputs: Inputs) -> None:
        (inputs.tmp / "spec.yaml").write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def _looping_link(inputs: Inputs) -> None:
    (inputs.tmp / "spec.yaml").symlink_to(inputs.tmp / "spec.yaml")  # unreadable for any user, root included


def _model(edit: Callable[[Path], None]) -> Callable[[Inputs], None]:
    """A copy of synthetic://llama-tiny at {tmp}/model, then `edit` applied to it."""
    def setup(inputs: Inputs) -> None:
        model = Path(shutil.copytree(open_model_source("synthetic://llama-tiny").path, inputs.tmp / "model"))
        edit(model)
    return setup


def _index(model: Path) -> dict:
    return json.loads((model / "model.safetensors.index.json").read_text())


def _point_first_shard_at(target: str) -> Callable[[Path], None]:
    def edit(model: Path) -> None:
        index = _index(model)
        first = sorted(set(index["weight_map"].values()))[0]
        index["weight_map"] = {k: (target + v if target.endswith("/") else target) if v == first else v
                               for k, v in index["weight_map"].items()}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
    return edit


def _pickle_only(model: Path) -> None:
    for path in model.glob("*.safetensors*"):
        path.unlink()
    (model / "pytorch_model.bin").write_bytes(b"\x80\x04\x95")  # never unpickled: its name is enough


def _truncate_a_shard(model: Path) -> None:
    shard = model / _index(model)["weight_map"]["model.layers.3.mlp.down_proj.weight"]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])


def _double_intermediate_size(model: Path) -> None:
    config = json.loads((model / "config.json").read_text())
    config["intermediate_size"] *= 2  # the shards keep the old [256, 128] MLP weights
    (model / "config.json").write_text(json.dumps(config))


def _calibration_file(name: str, content: bytes | None) -> Callable[[Inputs], None]:
    def setup(inputs: Inputs) -> None:
        path = inputs.tmp / name
        if content is None:  # a file every user, root included, fails to read: EIO at offset 0
            path.symlink_to("/proc/self/mem")
        else:
            path.write_bytes(content)
    return setup


def _s3(bucket: str | None, prefix: str, secret: str | None = None,
        manifest: dict | None = None) -> Callable[[Inputs], None]:
    """The local S3 server's variables (optionally a wrong secret); the output s3://bucket/prefix (bucket None:
    one that does not exist), holding `manifest` (another job's finished output) if given."""
    def setup(inputs: Inputs) -> None:
        server = inputs.server("s3_server")
        inputs.env |= server.env() | ({"AWS_SECRET_ACCESS_KEY": secret} if secret else {})
        if bucket is not None:
            server.create_bucket(bucket)
            if manifest is not None:
                server.client().put_object(Bucket=bucket, Key=f"{prefix}/rayquant-manifest.json",
                                           Body=json.dumps(manifest).encode())
        inputs.output = f"s3://{bucket or 'no-such-bucket-rq'}/{prefix}"
    return setup


def _closed_s3_endpoint(inputs: Inputs) -> None:
    _s3(BUCKET, "unreachable")(inputs)
    inputs.env["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"


def _hub(repo: str, manifest: dict | None, output: str) -> Callable[[Inputs], None]:
    """The local Hub's variables; `repo` created (with `manifest` committed to main if given)."""
    def setup(inputs: Inputs) -> None:
        from huggingface_hub import HfApi

        server = inputs.server("hub_server")
        inputs.env |= server.env(inputs.tmp / "hf-home")
        api = HfApi(endpoint=server.endpoint, token=server.token)
        api.create_repo(repo, exist_ok=True)
        if manifest is not None:
            api.upload_file(path_or_fileobj=json.dumps(manifest).encode(), path_in_repo="rayquant-manifest.json",
                            repo_id=repo)
        inputs.output = output
    return setup


def _another_jobs_output(inputs: Inputs) -> None:
    shutil.copytree(open_model_source("synthetic://llama-tiny").path, inputs.tmp / "out")  # a plain fp model


def _file_on_the_path(inputs: Inputs) -> None:
    (inputs.tmp / "file").write_text("not a directory\n")


def _read_only_output(inputs: Inputs) -> None:
    if os.geteuid() == 0:  # root writes through file modes: sysfs refuses new directories to everyone
        inputs.output = "/sys/rayquant-catalogue/out"
        return
    (inputs.tmp / "read-only").mkdir(mode=0o555)
    inputs.output = str(inputs.tmp / "read-only" / "out")


def _ray_head(inputs: Inputs) -> None:
    head: RayHead = inputs.server("catalogue_ray_head")
    inputs.env |= head.env() | {"RAY_ADDRESS": head.address}


OTHER_JOB = {"job_fingerprint": "0" * 64, "files": []}  # what another job's finished output starts with

CASES = [
    # --- the spec: refused before torch or Ray are imported
    Case("spec-unknown-key", _spec_file("name: x\nquant:\n  bits: 4\n  colour: blue\n"),
         ("quantize", "{tmp}/spec.yaml", "--set", "output.uri={out}"), "SpecError", "quant.colour: unknown key",
         SPEC_S),
    Case("spec-bits-5", None, quantize("quant.bits=5"), "SpecError", "use 2, 3, 4 or 8", SPEC_S),
    Case("spec-group-size-0", None, quantize("quant.group_size=0"), "SpecError", "use -1", SPEC_S),
    Case("spec-group-size-no-loader-reads", None, quantize("quant.group_size=100"), "SpecError",
         "the nearest group_size a loader reads is 128", SPEC_S),
    Case("spec-fewer-samples-than-workers", None, quantize("calibration.n_samples=1", "cluster.num_workers=2"),
         "SpecError", "raise calibration.n_samples or lower cluster.num_workers", SPEC_S),
    Case("spec-damp-negative", None, quantize("quant.damp_percent=-0.1"), "SpecError", "quant.damp_percent", SPEC_S),
    Case("spec-override-changes-nothing", None, quantize("quant.overrides=[{pattern: down_proj}]"), "SpecError",
         "set bits, group_size or skip: true", SPEC_S),
    Case("spec-lm-head", None, quantize("quant.lm_head=true"), "SpecError", "set quant.lm_head: false", SPEC_S),
    Case("spec-trust-remote-code", None, quantize("model.trust_remote_code=true"), "SpecError",
         "set model.trust_remote_code: false", SPEC_S),
    Case("spec-unsafe-name", None, quantize("name=../../etc"), "SpecError", "use 1-100 letters, digits", SPEC_S),
    Case("spec-output-scheme", None, quantize("output.uri=ftp://host/out"), "SpecError",
         "use a local directory, s3://bucket[/prefix] or hf://org/name[@branch]", SPEC_S),
    Case("spec-cluster-output-not-shared", None, quantize("cluster.address=ray://127.0.0.1:10001"), "SpecError",
         "set output.shared: true", SPEC_S),
    Case("spec-set-without-value", None, ("quantize", str(SPEC), "--set", "quant.bits"), "SpecError",
         "expected key.path=value", SPEC_S),
    Case("spec-yaml-alias-bomb", _spec_file(ALIAS_BOMB), ("quantize", "{tmp}/spec.yaml", "--set", "quant.bits=8"),
         "SpecError", "YAML anchors and aliases (&name, *name, <<:) are not allowed in a job spec; write the values "
         "out", SPEC_S),
    Case("spec-invalid-yaml", _spec_file("name: x\nquant: [4, 128\n"), ("quantize", "{tmp}/spec.yaml"), "SpecError",
         "at line 3, column 1 (while parsing a flow sequence at line 2, column 8); fix the YAML there", SPEC_S),
    Case("spec-duplicate-key", _spec_file("quant:\n  bits: 4\n  group_size: 64\n  bits: 8\n"),
         ("quantize", "{tmp}/spec.yaml"), "SpecError", "key 'bits' appears twice in one section; keep one", SPEC_S),
    Case("spec-binary-file", _spec_file(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256))),
         ("quantize", "{tmp}/spec.yaml"), "SpecError", "is not UTF-8 text (byte 0 is 0x89)", SPEC_S),
    Case("spec-directory", None, ("quantize", "{tmp}"), "SpecError", "is a directory; pass the path of a job spec",
         SPEC_S),
    Case("spec-unreadable", _looping_link, ("quantize", "{tmp}/spec.yaml"), "SpecError", "check its permissions",
         SPEC_S),
    Case("spec-missing", None, ("quantize", "{tmp}/no-such-spec.yaml"), "SpecError",
         "does not exist; pass the path of a job spec YAML", SPEC_S),
    # --- the model: refused in preflight (first half), after Ray started
    Case("model-missing", None, quantize("model.source={tmp}/no-such-model"), "ModelNotFound",
         "set model.source to a directory with config.json and *.safetensors", RAY_S),
    Case("model-pickle-only", _model(_pickle_only), quantize("model.source={tmp}/model"), "ModelNotFound",
         "rayquant reads safetensors only", RAY_S),
    Case("model-truncated-safetensors", _model(_truncate_a_shard), quantize("model.source={tmp}/model"),
         "CorruptSafetensors", "the file is truncated; re-download or re-copy the file", RAY_S),
    Case("model-config-disagrees-with-weights", _model(_double_intermediate_size), quantize("model.source={tmp}/model"),
         "InvalidModelFiles", "[256, 128] in the weights, [512, 128] by config.json", RAY_S),
    Case("model-index-dotdot", _model(_point_first_shard_at("../")), quantize("model.source={tmp}/model"),
         "InvalidModelFiles", "outside the model directory", RAY_S),
    Case("model-index-absolute", _model(_point_first_shard_at("/etc/passwd")), quantize("model.source={tmp}/model"),
         "InvalidModelFiles", "re-download the model from a source you trust", RAY_S),
    Case("model-encoder-only", None, quantize("model.source=synthetic://bert-tiny"), "UnsupportedArchitecture",
         "choose a causal LM checkpoint", RAY_S),
    # --- calibration data: refused while the windows are cut (preflight, second half)
    Case("calibration-missing-file", None, quantize("calibration.dataset={tmp}/no-such-data.txt"), "DatasetNotFound",
         "check the path", RAY_S),
    Case("calibration-unreadable-file", _calibration_file("data.txt", None),
         quantize("calibration.dataset={tmp}/data.txt"),
         "UnreadableDataset", "check its permissions or point calibration.dataset at a readable file", RAY_S),
    Case("calibration-empty-file", _calibration_file("data.jsonl", b'{"text": ""}\n'),
         quantize("calibration.dataset={tmp}/data.jsonl"), "EmptyDataset", "point calibration.dataset at a file",
         RAY_S),
    Case("calibration-too-few-tokens", _calibration_file("data.txt", b"hello world. " * 20),
         quantize("calibration.dataset={tmp}/data.txt"), "CalibrationTooShort", "lower calibration.seq_len", RAY_S),
    # --- storage: S3 and the Hub (their local servers)
    Case("s3-unreachable-endpoint", _closed_s3_endpoint, quantize(f"output.uri=s3://{BUCKET}/unreachable"),
         "S3Unreachable", "AWS_ENDPOINT_URL points at it", RAY_S),
    Case("s3-wrong-secret", _s3(BUCKET, "denied", secret="not-the-secret-8c1f0e"),
         quantize(f"output.uri=s3://{BUCKET}/denied"), "S3AccessDenied",
         "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY", RAY_S),
    Case("s3-missing-bucket", _s3(None, "out"), quantize("output.uri=s3://no-such-bucket-rq/out"), "S3ObjectNotFound",
         "create bucket 'no-such-bucket-rq'", RAY_S),
    Case("s3-missing-model-source", _s3(BUCKET, "nosource"),
         quantize(f"model.source=s3://{BUCKET}/no-such-model", f"output.uri=s3://{BUCKET}/nosource"),
         "ModelNotFound", "point model.source at the prefix or repository that holds the model's config.json", RAY_S),
    Case("s3-another-model-at-target", _s3(BUCKET, "other", manifest=OTHER_JOB),
         quantize(f"output.uri=s3://{BUCKET}/other"), "OutputConflict", "choose another output.uri", RAY_S),
    Case("hub-unknown-revision", _hub("org/catalogue-source", None, "hf://org/catalogue-never-written"),
         quantize("model.source=hf://org/catalogue-source@no-such-branch",
                  "output.uri=hf://org/catalogue-never-written"),
         "HubRevisionNotFound", "fix the revision after '@' in model.source", RAY_S),
    Case("hub-another-model-at-target", _hub("org/catalogue-other", OTHER_JOB, "hf://org/catalogue-other"),
         quantize("output.uri=hf://org/catalogue-other"), "OutputConflict", "choose another output.uri", RAY_S),
    # --- the cluster
    Case("cluster-submit-unreachable-address", None,
         ("submit", str(SPEC), "--address", "http://127.0.0.1:9", "--set", "output.uri={out}", "--set",
          "output.shared=true"), "ClusterUnreachable", "check the address", CLUSTER_S),
    Case("cluster-quantize-unreachable-address", None, quantize("cluster.address=127.0.0.1:9", "output.shared=true"),
         "ClusterUnreachable", "remove cluster.address to run on embedded Ray", CLUSTER_S),
    Case("cluster-quantize-unresolvable-ray-client", None,
         quantize("cluster.address=ray://no-such-head.invalid", "output.shared=true"), "ClusterUnreachable",
         "ray://head:10001 for Ray Client", CLUSTER_S),
    Case("cluster-status-unknown-job-id", _ray_head, ("status", "rq-doesnotexist"), "JobNotFound",
         "`rayquant list` shows its jobs", CLUSTER_S),
    Case("cluster-status-without-address", None, ("status", "rq-doesnotexist"), "NoClusterAddress",
         "pass --address http://HEAD:8265", CLUSTER_S),
    Case("cluster-lacks-the-gpus", None, quantize("cluster.gpus_per_worker=1"), "ClusterTooSmall",
         "set cluster.gpus_per_worker: 0 (CPU workers)", RAY_S),
    # --- the output
    Case("output-holds-another-model", _another_jobs_output, quantize(), "OutputConflict", "output.uri", RAY_S),
    Case("output-under-a-file", _file_on_the_path, quantize("output.uri={tmp}/file/out"), "OutputNotWritable",
         "file is a file); choose an output.uri", RAY_S),
    Case("output-read-only", _read_only_output, quantize(), "OutputNotWritable",
         "in a directory you can write", RAY_S),
]
BY_ID = {case.id: case for case in CASES}


@pytest.fixture(scope="module")
def catalogue_ray_head(synthetic_cache):
    """A Ray head with token auth, for the cases that talk to a cluster's Jobs API."""
    with run_ray_head(num_cpus=1) as head:
        yield head


@dataclass(frozen=True)
class Started:
    inputs: Inputs
    before: object  # what the output held before the run (_published)
    run: Future  # -> (the finished process, or the TimeoutExpired that ended it; its seconds)


class CaseRunner:
    """Runs the selected cases AT_ONCE at a time, in the tests' order: while one case's test waits for its
    run, the next case's run goes on beside it. Setups run here, on the tests' thread (fixtures are not
    thread-safe); only the CLI processes run on the pool."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path_factory, selected: list[str]):
        self.request, self.tmp_path_factory, self.selected = request, tmp_path_factory, selected
        self.pool = ThreadPoolExecutor(AT_ONCE, thread_name_prefix="catalogue")
        self.started: dict[str, Started] = {}

    def run(self, case: Case) -> tuple[Started, subprocess.CompletedProcess | subprocess.TimeoutExpired, float]:
        at = self.selected.index(case.id)
        for following in self.selected[at:at + AT_ONCE]:
            if following not in self.started:
                self.started[following] = self._start(BY_ID[following])
        started = self.started[case.id]
        return (started, *started.run.result())

    def _start(self, case: Case) -> Started:
        inputs = Inputs(self.tmp_path_factory.mktemp(case.id), self.request)
        inputs.output = str(inputs.tmp / "out")
        if case.setup is not None:
            case.setup(inputs)
        # the case's servers only: no AWS_*, HF_* or RAY_ADDRESS of this process
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_", "HUGGING", "RAY_ADDRESS"))}
        argv = [sys.executable, "-m", "rayquant.jobs.cli", *(_fill(a, inputs) for a in case.args)]
        before = _published(inputs)
        return Started(inputs, before, self.pool.submit(_run_cli, argv, env | inputs.env, case.timeout_s))


def _run_cli(argv: list[str], env: dict[str, str], timeout_s: float):
    t = time.monotonic()
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, cwd=REPO, env=env)
    except subprocess.TimeoutExpired as err:
        return err, time.monotonic() - t
    return proc, time.monotonic() - t


@pytest.fixture(scope="module")
def runner(request, tmp_path_factory):
    selected = [item.callspec.id for item in request.session.items
                if item.module is request.module and hasattr(item, "callspec")]
    runner = CaseRunner(request, tmp_path_factory, selected)
    yield runner
    runner.pool.shutdown(wait=True)  # a run started ahead of a failed test ends within its timeout


def _fill(arg: str, inputs: Inputs) -> str:
    return arg.replace("{tmp}", str(inputs.tmp)).replace("{out}", inputs.output)


def _published(inputs: Inputs) -> object:
    """What the case's output holds: local files and their bytes, S3 objects, or the Hub repo's commits."""
    target = inputs.output
    if target.startswith("s3://"):
        bucket, _, prefix = target.removeprefix("s3://").partition("/")
        client = inputs.server("s3_server").client()
        if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            return None
        listed = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])
        return {o["Key"]: o["ETag"] for o in listed}
    if target.startswith("hf://"):
        repo = inputs.server("hub_server").repos.get(target.removeprefix("hf://").partition("@")[0])
        return None if repo is None else (dict(repo.refs), sorted(repo.commits))
    path = Path(target)
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", CASES, ids=list(BY_ID))
def test_bad_input_exits_2_naming_the_fix_and_publishes_nothing(case: Case, runner: CaseRunner):
    started, proc, seconds = runner.run(case)
    assert not isinstance(proc, subprocess.TimeoutExpired), f"{case.id} still ran after {case.timeout_s} s"
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    # stderr off a terminal: JSON log lines, and the one error line
    lines = [line for line in proc.stderr.splitlines() if not line.startswith("{")]
    assert len(lines) == 1 and lines[0].startswith(f"error: {case.error}: "), lines
    assert case.fix in lines[0], lines[0]
    assert _published(started.inputs) == started.before
    for secret in (started.inputs.env.get("AWS_SECRET_ACCESS_KEY"), started.inputs.env.get("HF_TOKEN")):
        assert not secret or secret not in proc.stdout + proc.stderr
    assert seconds < case.timeout_s

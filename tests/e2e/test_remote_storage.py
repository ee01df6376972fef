"""Models from S3 and checkpoints to S3 through the CLI, against a real S3 server (SeaweedFS, SigV4).

The job reads the source's tensors with ranged GETs, builds the output in a local work directory, uploads
each shard as it closes and the manifest last; a reader polling the bucket meanwhile must never find a
manifest before every file it lists is there, complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from rayquant.storage.model_source import open_model_source

from .models import SPEC, log_events, run_cli

pytestmark = pytest.mark.slow

SMALL_SHARDS = "output.max_shard_bytes=120000"  # about one block per shard: several upload during the job
MANIFEST = "rayquant-manifest.json"
# files that name the source (URI, revision) and so differ between a local and an S3 source
NAMES_THE_SOURCE = {"README.md", "report.json", MANIFEST}


@pytest.fixture(scope="module")
def local_run(quantize_once):
    """The same job local -> local: the bytes an S3 job must reproduce."""
    quantize_once.start(SMALL_SHARDS)
    return quantize_once(SMALL_SHARDS).output()


@pytest.fixture(scope="module")
def s3_source(s3_server) -> str:
    """synthetic://llama-tiny's files uploaded to s3://models/llama-tiny."""
    client = s3_server.client()
    s3_server.create_bucket("models")
    source = open_model_source("synthetic://llama-tiny").path
    for path in sorted(source.iterdir()):
        client.upload_file(str(path), "models", f"llama-tiny/{path.name}")
    return "s3://models/llama-tiny"


def _env(s3_server, cache: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    return {**env, **s3_server.env(), "RAYQUANT_CACHE": str(cache), **extra}


def _quantize(env: dict, *sets: str):
    """`rayquant quantize` with these `--set`s; whatever it prints holds none of the credentials it was given."""
    proc = run_cli("quantize", str(SPEC), *(a for s in sets for a in ("--set", s)), env=env)
    for secret in (env.get("AWS_SECRET_ACCESS_KEY"), env.get("HF_TOKEN")):
        assert not secret or secret not in proc.stdout + proc.stderr
    return proc


def _objects(client, bucket: str, prefix: str) -> dict[str, bytes]:
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/").get("Contents", [])]
    return {k.removeprefix(prefix + "/"): client.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


class ManifestWatcher(threading.Thread):
    """Lists the output prefix over and over; each time a manifest is there, checks every file it lists."""

    def __init__(self, client, bucket: str, prefix: str):
        super().__init__(daemon=True)
        self.client, self.bucket, self.prefix = client, bucket, prefix
        self.stop = threading.Event()
        self.polls_before_manifest = 0  # listings that found shards but no manifest yet
        self.manifest_checks: list[list[str]] = []  # per sighting: files listed but missing or different

    def run(self) -> None:
        while not self.stop.is_set():
            listed = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix + "/").get("Contents", [])
            names = {o["Key"].removeprefix(self.prefix + "/"): o["Size"] for o in listed}
            if MANIFEST in names:
                self.manifest_checks.append(self._check(names))
                return
            if any(n.endswith(".safetensors") for n in names):
                self.polls_before_manifest += 1
            self.stop.wait(0.05)

    def _check(self, sizes: dict[str, int]) -> list[str]:
        key = f"{self.prefix}/{MANIFEST}"
        manifest = json.loads(self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read())
        bad = []
        for entry in manifest["files"]:
            if sizes.get(entry["path"]) != entry["size"]:
                bad.append(entry["path"])
                continue
            body = self.client.get_object(Bucket=self.bucket, Key=f"{self.prefix}/{entry['path']}")["Body"].read()
            if hashlib.sha256(body).hexdigest() != entry["sha256"]:
                bad.append(entry["path"])
        return bad


@pytest.mark.parametrize("source", ["local", "s3"])
def test_job_to_s3_publishes_the_local_jobs_bytes_and_the_manifest_last(source, local_run, s3_source, s3_server,
                                                                        tmp_path):
    client = s3_server.client()
    bucket = s3_server.create_bucket("outputs")
    prefix = f"{source}-to-s3"
    model = s3_source if source == "s3" else "synthetic://llama-tiny"
    watcher = ManifestWatcher(client, bucket, prefix)
    watcher.start()
    try:
        proc = _quantize(_env(s3_server, tmp_path / "cache"), SMALL_SHARDS, f"model.source={model}",
                         f"output.uri=s3://{bucket}/{prefix}")
    finally:
        watcher.stop.set()
        watcher.join()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == f"s3://{bucket}/{prefix}"
    published = log_events(proc.stderr, "output_published")
    assert len(published) == 1 and published[0]["tail_seconds"] <= published[0]["upload_seconds"] + 5

    uploaded = _objects(client, bucket, prefix)
    local = {p.name: p.read_bytes() for p in local_run.iterdir() if p.is_file() and p.name != "run-stats.json"}
    assert len([n for n in uploaded if n.endswith(".safetensors")]) >= 3
    assert set(uploaded) == set(local)
    differ = sorted(n for n in local if n not in NAMES_THE_SOURCE and uploaded[n] != local[n])
    assert differ == []
    manifest = json.loads(uploaded[MANIFEST])
    assert {e["path"]: e["sha256"] for e in manifest["files"]} == {
        n: hashlib.sha256(b).hexdigest() for n, b in uploaded.items() if n != MANIFEST}
    if source == "s3":
        report = json.loads(uploaded["report.json"])
        assert report["source_revision"] == manifest["source_revision"] != json.loads(local["report.json"])[
            "source_revision"]
    # the reader never saw a manifest before its files; it did see the output grow first
    assert watcher.manifest_checks == [[]]
    assert not (tmp_path / "cache" / "outputs").exists() or not any((tmp_path / "cache" / "outputs").iterdir())

    again = _quantize(_env(s3_server, tmp_path / "cache"), SMALL_SHARDS, f"model.source={model}",
                      f"output.uri=s3://{bucket}/{prefix}")
    assert again.returncode == 0, again.stderr[-3000:]
    assert log_events(again.stderr, "job_already_complete") and not log_events(again.stderr, "block_done")
    assert _objects(client, bucket, prefix) == uploaded


def test_another_model_at_the_s3_target_is_refused_before_any_work(local_run, s3_source, s3_server, tmp_path):
    """After test_job_to_s3_...[s3] (the same module, run first): that output is another job's model."""
    bucket, prefix = "outputs", "s3-to-s3"
    before = _objects(s3_server.client(), bucket, prefix)
    assert "rayquant-manifest.json" in before
    other = _quantize(_env(s3_server, tmp_path / "cache"), "quant.bits=8", f"model.source={s3_source}",
                      f"output.uri=s3://{bucket}/{prefix}")
    assert other.returncode == 2, other.stderr[-3000:]
    assert "another job" in other.stderr and f"s3://{bucket}/{prefix}" in other.stderr
    assert not log_events(other.stderr, "job_planned")
    assert _objects(s3_server.client(), bucket, prefix) == before


# bad S3 input (wrong secret, missing bucket or source, another model at the target, ...): the catalogue in
# tests/e2e/test_bad_input_catalogue.py


# --- the Hub: huggingface_hub's real client against the local Hub of tests/hub_server.py (the real Hub
# cannot be reached here; what that server does not model, e.g. Xet uploads, is untested)

UPLOAD_FOLDER = """
import sys
from huggingface_hub import HfApi
api = HfApi()
api.create_repo(sys.argv[1], exist_ok=True)
print(api.upload_folder(folder_path=sys.argv[2], repo_id=sys.argv[1]).oid)
"""


def _hub_env(hub_server, tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, **hub_server.env(tmp_path / "hf-home"), "RAYQUANT_CACHE": str(tmp_path / "cache")}


@pytest.fixture(scope="module")
def hub_source(hub_server, tmp_path_factory) -> tuple[str, str]:
    """synthetic://llama-tiny pushed to the local Hub as org/llama-tiny; (repo, commit sha)."""
    import subprocess
    import sys

    env = _hub_env(hub_server, tmp_path_factory.mktemp("hub-upload"))
    source = open_model_source("synthetic://llama-tiny").path
    proc = subprocess.run([sys.executable, "-c", UPLOAD_FOLDER, "org/llama-tiny", str(source)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return "org/llama-tiny", proc.stdout.strip().splitlines()[-1].rsplit("/", 1)[-1]


def test_hub_to_hub_job_publishes_the_local_jobs_bytes_in_one_commit(local_run, hub_source, hub_server, tmp_path):
    repo, sha = hub_source
    env = _hub_env(hub_server, tmp_path)
    proc = _quantize(env, SMALL_SHARDS, f"model.source=hf://{repo}@main", "output.uri=hf://org/llama-tiny-gptq")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert hub_server.token not in proc.stderr + proc.stdout
    published = hub_server.repos["org/llama-tiny-gptq"]
    assert published.private
    head = published.commits[published.refs["main"]]
    files = {name: _blob_bytes(hub_server, blob) for name, blob in head.items() if name != ".gitattributes"}
    local = {p.name: p.read_bytes() for p in local_run.iterdir() if p.is_file() and p.name != "run-stats.json"}
    assert set(files) == set(local)
    assert sorted(n for n in local if n not in NAMES_THE_SOURCE and files[n] != local[n]) == []
    report = json.loads(files["report.json"])
    assert report["source_revision"] == sha  # the branch resolved to its commit before the job started
    assert len(published.commits) == 2  # the repo's first commit, then the whole output in one


def _blob_bytes(hub_server, blob) -> bytes:
    return blob.content if blob.content is not None else hub_server.objects[blob.oid]

"""Publishing a checkpoint to a real S3 server (SeaweedFS on loopback): files to their final keys with
checksums, the manifest last and created only if absent, reruns that upload nothing, and the typed
errors of a conflicting target, a missing bucket, wrong credentials and a server that dies mid-upload."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest
from botocore.exceptions import EndpointConnectionError
from structlog.testing import capture_logs

from rayquant.storage import s3_sink
from rayquant.storage.atomic_files import file_entry
from rayquant.storage.s3_files import S3AccessDenied, S3ObjectNotFound, S3Unreachable, read_s3_object, s3_client
from rayquant.storage.s3_sink import S3OutputConflict, S3Sink
from tests.s3_server import S3Server, free_port, run_s3_server

BUCKET = "rayquant-s3-sink"
MANIFEST = "rayquant-manifest.json"
SHARDS = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
SMALL_FILES = ["config.json", "README.md"]


@pytest.fixture
def bucket(s3_env) -> str:
    return s3_env.create_bucket(BUCKET)


@pytest.fixture
def target(bucket, request) -> str:
    """A prefix of its own per test, in the shared bucket."""
    return f"s3://{bucket}/{request.node.name.replace('[', '-').rstrip(']')}"


def write_output(out: Path, fingerprint: str = "job-a" * 8, shard_bytes: int = 300_000) -> Path:
    """A finished local output: two shards, two small files, run-stats.json and the manifest over all but
    run-stats.json, as storage/finished_checkpoint.py writes them."""
    out.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(SHARDS):
        (out / name).write_bytes(hashlib.sha256(f"{fingerprint}{i}".encode()).digest() * (shard_bytes // 32))
    (out / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (out / "README.md").write_text(f"# {fingerprint}\n")
    (out / "run-stats.json").write_text(json.dumps({"seconds": 1.5}))
    manifest = {"manifest_format": 1, "job_fingerprint": fingerprint,
                "files": [file_entry(out, name) for name in SHARDS + SMALL_FILES]}
    (out / MANIFEST).write_text(json.dumps(manifest, sort_keys=True))
    return out


def published_names(files: list[str]) -> list[str]:
    return [*files, "run-stats.json"]


def remote_objects(server: S3Server, uri: str) -> dict[str, tuple[str, object]]:
    """{relative key: (ETag, LastModified)} under uri, read by a client of the test's own."""
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    pages = server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=f"{prefix}/")
    return {o["Key"][len(prefix) + 1:]: (o["ETag"], o["LastModified"]) for p in pages for o in p.get("Contents", [])}


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_publish_uploads_every_file_then_the_manifest_last(s3_env, target, tmp_path):
    out = write_output(tmp_path / "out")
    sink = S3Sink(target)
    sink.check_writable()
    assert sink.published_manifest() is None
    with capture_logs() as logs:
        sink.publish(out, published_names(SHARDS + SMALL_FILES))

    assert sorted(remote_objects(s3_env, target)) == sorted([*SHARDS, *SMALL_FILES, "run-stats.json", MANIFEST])
    for name in [*SHARDS, *SMALL_FILES, "run-stats.json", MANIFEST]:
        assert read_s3_object(f"{target}/{name}") == (out / name).read_bytes(), name
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    head = s3_env.client().head_object(Bucket=bucket, Key=f"{prefix}/{SHARDS[0]}")
    assert head["Metadata"]["sha256"] == hashlib.sha256((out / SHARDS[0]).read_bytes()).hexdigest()
    assert sink.published_manifest() == json.loads((out / MANIFEST).read_text())
    order = [e["event"] for e in logs if e["event"] in ("s3_upload_done", "s3_manifest_created")]
    assert order == ["s3_upload_done"] * 5 + ["s3_manifest_created"]
    uploaded = {e["name"]: e["bytes"] for e in events(logs, "s3_upload_done")}
    assert uploaded[SHARDS[1]] == (out / SHARDS[1]).stat().st_size


def test_second_publish_uploads_nothing(s3_env, target, tmp_path):
    out = write_output(tmp_path / "out")
    S3Sink(target).publish(out, published_names(SHARDS + SMALL_FILES))
    before = remote_objects(s3_env, target)
    with capture_logs() as logs:
        S3Sink(target).publish(out, published_names(SHARDS + SMALL_FILES))
    assert remote_objects(s3_env, target) == before
    assert events(logs, "s3_upload_done") == [] and len(events(logs, "s3_already_published")) == 1


def test_publish_after_shards_uploaded_as_they_closed_skips_them(s3_env, target, tmp_path):
    out = write_output(tmp_path / "out")
    sink = S3Sink(target)
    for name in SHARDS:  # the job uploads each shard when its last block is durable
        sink.upload_file(out / name, name, hashlib.sha256((out / name).read_bytes()).hexdigest())
    before = remote_objects(s3_env, target)
    with capture_logs() as logs:
        sink.publish(out, published_names(SMALL_FILES))
    assert sorted(e["name"] for e in events(logs, "s3_upload_skipped")) == SHARDS
    assert sorted(e["name"] for e in events(logs, "s3_upload_done")) == sorted([*SMALL_FILES, "run-stats.json"])
    after = remote_objects(s3_env, target)
    assert all(after[name] == before[name] for name in SHARDS)
    assert MANIFEST in after


def test_upload_of_changed_bytes_replaces_the_object(s3_env, target, tmp_path):
    local = tmp_path / "config.json"
    local.write_text('{"a": 1}')
    sink = S3Sink(target)
    sink.upload_file(local, "config.json", hashlib.sha256(local.read_bytes()).hexdigest())
    local.write_text('{"a": 2}')
    sink.upload_file(local, "config.json", hashlib.sha256(local.read_bytes()).hexdigest())
    assert read_s3_object(f"{target}/config.json") == b'{"a": 2}'


def test_another_jobs_manifest_is_a_conflict_before_any_upload(s3_env, target, tmp_path):
    S3Sink(target).publish(write_output(tmp_path / "a", fingerprint="job-a" * 8), published_names(SHARDS + SMALL_FILES))
    before = remote_objects(s3_env, target)
    with capture_logs() as logs, pytest.raises(S3OutputConflict) as err:
        S3Sink(target).publish(write_output(tmp_path / "b", fingerprint="job-b" * 8), published_names(SHARDS))
    assert "another job" in str(err.value) and "choose another output.uri" in str(err.value)
    assert events(logs, "s3_upload_done") == [] and remote_objects(s3_env, target) == before


def test_objects_of_no_rayquant_output_are_a_conflict(s3_env, target, tmp_path):
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    s3_env.client().put_object(Bucket=bucket, Key=f"{prefix}/notes/todo.txt", Body=b"mine")
    with capture_logs() as logs, pytest.raises(S3OutputConflict, match="notes/todo.txt"):
        S3Sink(target).publish(write_output(tmp_path / "out"), published_names(SHARDS))
    assert events(logs, "s3_upload_done") == []


def test_a_manifest_that_is_not_ours_is_a_conflict(s3_env, target):
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    s3_env.client().put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=b"[1, 2]")
    with pytest.raises(S3OutputConflict, match="rayquant did not write"):
        S3Sink(target).published_manifest()


class RivalBeforeCommit(S3Sink):
    """A sink that, once its last file is up, lets another job's manifest land first (the race the
    conditional create exists for)."""

    def __init__(self, uri: str, rival_manifest: bytes, last_file: str):
        super().__init__(uri)
        self.rival_manifest, self.last_file = rival_manifest, last_file

    def _upload(self, local: Path, name: str, sha256: str, size: int) -> None:
        super()._upload(local, name, sha256, size)
        if name == self.last_file:
            bucket, _, prefix = self.uri.removeprefix("s3://").partition("/")
            s3_client().put_object(Bucket=bucket, Key=f"{prefix}/{MANIFEST}", Body=self.rival_manifest)


def test_manifest_of_another_job_landing_first_is_a_conflict_at_the_create(s3_env, target, tmp_path):
    rival = (write_output(tmp_path / "b", fingerprint="job-b" * 8) / MANIFEST).read_bytes()
    sink = RivalBeforeCommit(target, rival, "run-stats.json")
    with pytest.raises(S3OutputConflict, match="another job"):
        sink.publish(write_output(tmp_path / "a"), published_names(SHARDS + SMALL_FILES))
    assert read_s3_object(f"{target}/{MANIFEST}") == rival  # never overwritten


def test_same_model_published_by_another_run_meanwhile_is_fine(s3_env, target, tmp_path):
    out = write_output(tmp_path / "a")
    # the same job's manifest, in other bytes, so the test sees whose create won
    twin = (write_output(tmp_path / "twin") / MANIFEST).read_bytes().replace(b'"files"', b'"files" ')
    with capture_logs() as logs:
        RivalBeforeCommit(target, twin, "run-stats.json").publish(out, published_names(SHARDS + SMALL_FILES))
    assert read_s3_object(f"{target}/{MANIFEST}") == twin  # the first create wins; nobody overwrites it
    assert len(events(logs, "s3_manifest_found")) == 1 and events(logs, "s3_manifest_created") == []


def test_check_writable_aborts_uploads_a_crashed_run_left_under_the_prefix(s3_env, target):
    client = s3_env.client()
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    stale = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}/{SHARDS[0]}")
    client.upload_part(Bucket=bucket, Key=f"{prefix}/{SHARDS[0]}", UploadId=stale["UploadId"], PartNumber=1,
                       Body=b"x" * 2**20)
    elsewhere = client.create_multipart_upload(Bucket=bucket, Key=f"{prefix}-other/{SHARDS[0]}")
    with capture_logs() as logs:
        S3Sink(target).check_writable()
    assert events(logs, "s3_stale_uploads_aborted")[0]["count"] == 1
    assert client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", []) == []
    left = client.list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}-other/").get("Uploads", [])
    assert [u["UploadId"] for u in left] == [elsewhere["UploadId"]]  # another prefix's upload is not ours
    client.abort_multipart_upload(Bucket=bucket, Key=f"{prefix}-other/{SHARDS[0]}", UploadId=elsewhere["UploadId"])


def test_wrong_secret_is_access_denied_naming_the_variable_not_the_value(s3_env, target, monkeypatch):
    wrong_secret = "wrong-secret-9d2e7b40"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    with capture_logs() as logs, pytest.raises(S3AccessDenied) as err:
        S3Sink(target).check_writable()
    assert wrong_secret not in repr(logs)
    message = str(err.value)
    assert "AWS_SECRET_ACCESS_KEY" in message and "AWS_ACCESS_KEY_ID" in message and "write permission" in message
    assert wrong_secret not in message and s3_env.secret_key not in message


def test_missing_bucket_is_named_and_not_created(s3_env, tmp_path):
    missing = "rayquant-sink-no-such-bucket"
    with pytest.raises(S3ObjectNotFound, match=f"bucket not found.*create bucket '{missing}'"):
        S3Sink(f"s3://{missing}/out").check_writable()
    assert missing not in {b["Name"] for b in s3_env.client().list_buckets()["Buckets"]}


def test_endpoint_down_is_unreachable_naming_the_variable(s3_env, target, monkeypatch):
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    with pytest.raises(S3Unreachable, match="AWS_ENDPOINT_URL"):
        S3Sink(target).check_writable()


def test_file_over_the_threshold_uploads_in_checksummed_parts(s3_env, target, tmp_path, monkeypatch):
    monkeypatch.setattr(s3_sink, "PART_BYTES", 5 * 2**20)  # S3's smallest part
    big = tmp_path / SHARDS[0]
    big.write_bytes(os.urandom(11 * 2**20))
    sha256 = hashlib.sha256(big.read_bytes()).hexdigest()
    S3Sink(target).upload_file(big, SHARDS[0], sha256)
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    head = s3_env.client().head_object(Bucket=bucket, Key=f"{prefix}/{SHARDS[0]}", ChecksumMode="ENABLED")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 1 MiB
    assert head["ChecksumSHA256"].endswith("-3")  # S3 verified a SHA-256 per part
    assert head["Metadata"]["sha256"] == sha256
    assert read_s3_object(f"{target}/{SHARDS[0]}") == big.read_bytes()


def test_a_failed_part_aborts_the_upload_and_leaves_no_object(s3_env, target, tmp_path, monkeypatch):
    monkeypatch.setattr(s3_sink, "PART_BYTES", 5 * 2**20)
    monkeypatch.setattr(s3_sink, "CONCURRENT_PARTS", 1)  # no part in flight while the upload is aborted
    big = tmp_path / SHARDS[0]
    big.write_bytes(os.urandom(11 * 2**20))
    calls = []

    def drop_the_second_part(**_) -> None:  # the server stays up: s3transfer's abort reaches it
        calls.append(1)
        if len(calls) == 2:
            raise EndpointConnectionError(endpoint_url=s3_env.endpoint)

    s3_client().meta.events.register("after-call.s3.UploadPart", drop_the_second_part)
    try:
        with pytest.raises(S3Unreachable, match="AWS_ENDPOINT_URL"):
            S3Sink(target).upload_file(big, SHARDS[0], "0" * 64)
    finally:
        s3_client().meta.events.unregister("after-call.s3.UploadPart", drop_the_second_part)
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    assert s3_env.client().list_multipart_uploads(Bucket=bucket, Prefix=f"{prefix}/").get("Uploads", []) == []
    assert remote_objects(s3_env, target) == {}


def test_publish_to_a_bucket_root(s3_env, tmp_path):
    bucket = s3_env.create_bucket("rayquant-s3-sink-root")
    out = write_output(tmp_path / "out")
    sink = S3Sink(f"s3://{bucket}")
    sink.check_writable()
    sink.publish(out, published_names(SHARDS + SMALL_FILES))
    keys = {o["Key"] for o in s3_env.client().list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert keys == {*SHARDS, *SMALL_FILES, "run-stats.json", MANIFEST}
    assert sink.published_manifest()["job_fingerprint"] == json.loads((out / MANIFEST).read_text())["job_fingerprint"]


@contextmanager
def without_conditional_writes(upstream: str) -> Iterator[str]:
    """A loopback proxy to `upstream` that answers 501 NotImplemented to every If-None-Match PUT, as an S3
    server without conditional writes does; yields its endpoint. Signatures stay valid: the Host header
    the client signed is passed through."""
    up = urlparse(upstream)

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # answers botocore's Expect: 100-continue at once (it waits 1 s otherwise)

        def forward(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if self.command == "PUT" and "If-None-Match" in self.headers:
                status, headers, payload = 501, {"Content-Type": "application/xml"}, (
                    b"<Error><Code>NotImplemented</Code><Message>If-None-Match</Message></Error>")
            else:
                conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn.request(self.command, self.path, body=body, headers=headers)
                answer = conn.getresponse()
                status, headers, payload = answer.status, dict(answer.getheaders()), answer.read()
                conn.close()
            self.send_response(status)
            for name, value in headers.items():
                if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = forward

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_server_without_conditional_writes_falls_back_to_check_then_put(s3_env, target, tmp_path, monkeypatch):
    out = write_output(tmp_path / "out")
    with without_conditional_writes(s3_env.endpoint) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with capture_logs() as logs:
            S3Sink(target).publish(out, published_names(SHARDS + SMALL_FILES))
    assert [e["log_level"] for e in events(logs, "s3_conditional_write_unsupported")] == ["warning"]
    assert len(events(logs, "s3_manifest_created")) == 1
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_env.endpoint)
    assert read_s3_object(f"{target}/{MANIFEST}") == (out / MANIFEST).read_bytes()


@pytest.fixture
def own_s3_server(tmp_path, monkeypatch) -> Iterator[S3Server]:
    """A server of this test's own, which it may kill and restart; its AWS_* variables set in-process."""
    with run_s3_server(tmp_path / "s3") as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        yield server


def test_server_killed_mid_upload_then_restarted_publishes_once(own_s3_server, tmp_path, monkeypatch):
    server = own_s3_server
    server.create_bucket(BUCKET)
    monkeypatch.setattr(s3_sink, "PART_BYTES", 5 * 2**20)
    monkeypatch.setattr(s3_sink, "CONCURRENT_PARTS", 1)  # parts in order: the kill lands after part 1
    out = write_output(tmp_path / "out", shard_bytes=16 * 2**20)
    target = f"s3://{BUCKET}/killed"
    sink = S3Sink(target)
    sink.check_writable()

    def kill_after_first_part(**_) -> None:
        server.stop()

    events_of_client = s3_client().meta.events
    events_of_client.register("after-call.s3.UploadPart", kill_after_first_part)
    try:
        with pytest.raises(S3Unreachable, match="did not answer"):
            sink.upload_file(out / SHARDS[0], SHARDS[0], hashlib.sha256((out / SHARDS[0]).read_bytes()).hexdigest())
    finally:
        events_of_client.unregister("after-call.s3.UploadPart", kill_after_first_part)

    with run_s3_server(server.data_dir, server.ports) as restarted:
        assert restarted.endpoint == server.endpoint
        with capture_logs() as logs:
            sink.check_writable()  # the upload the crash left (its abort could not reach the server)
            sink.publish(out, published_names(SHARDS + SMALL_FILES))
        assert events(logs, "s3_stale_uploads_aborted")[0]["count"] == 1
        assert len(events(logs, "s3_manifest_created")) == 1
        keys = sorted(remote_objects(restarted, target))
        assert keys == sorted([*SHARDS, *SMALL_FILES, "run-stats.json", MANIFEST])
        for name in SHARDS:
            assert read_s3_object(f"{target}/{name}") == (out / name).read_bytes()
        with capture_logs() as logs:
            sink.publish(out, published_names(SHARDS + SMALL_FILES))
        assert len(events(logs, "s3_already_published")) == 1 and events(logs, "s3_manifest_created") == []
        restarted.stop()  # a graceful stop of `weed mini` takes seconds; this test has no use for one

"""Reading whole objects from a real S3 server (SeaweedFS on loopback), and the typed errors when
the key is missing, the credentials are wrong, the endpoint is down or the connection drops."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from rayquant.storage.s3_files import (
    S3AccessDenied,
    S3ObjectNotFound,
    S3Unreachable,
    parse_s3_uri,
    read_s3_object,
)
from tests.s3_server import free_port

BUCKET = "rayquant-s3-files"


@pytest.fixture
def bucket(s3_env) -> str:
    return s3_env.create_bucket(BUCKET)


@contextmanager
def tcp_server(answer: Callable[[socket.socket], None]) -> Iterator[str]:
    """A loopback TCP server that hands every connection to `answer`; yields its http:// endpoint."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.recv(65536)  # the request head
                answer(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join()
        listener.close()


def test_parse_s3_uri_splits_bucket_and_key():
    where = parse_s3_uri("s3://bucket/dir/data.jsonl")
    assert (where.bucket, where.key) == ("bucket", "dir/data.jsonl")
    for bad in ("s3://bucket", "s3:///key", "http://bucket/key"):
        with pytest.raises(ValueError):
            parse_s3_uri(bad)


def test_reads_the_bytes_another_client_wrote(s3_env, bucket):
    body = os.urandom(3 * 2**20 + 17)  # larger than one filer chunk (filer.maxMB defaults to 4 in pieces)
    s3_env.client().put_object(Bucket=bucket, Key="calib/blob.bin", Body=body)
    assert read_s3_object(f"s3://{bucket}/calib/blob.bin") == body


def test_missing_key_names_the_uri_and_the_spec_field(bucket):
    with pytest.raises(S3ObjectNotFound) as err:
        read_s3_object(f"s3://{bucket}/no/such.jsonl")
    assert f"s3://{bucket}/no/such.jsonl: key not found" in str(err.value)
    assert "calibration.dataset" in str(err.value)


def test_missing_bucket_is_named(s3_env):
    with pytest.raises(S3ObjectNotFound, match="bucket not found"):
        read_s3_object("s3://rayquant-no-such-bucket/data.jsonl")


def test_wrong_secret_is_access_denied(s3_env, bucket, monkeypatch):
    s3_env.client().put_object(Bucket=bucket, Key="secret.txt", Body=b"x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(S3AccessDenied, match="AWS_SECRET_ACCESS_KEY"):
        read_s3_object(f"s3://{bucket}/secret.txt")


def test_endpoint_that_is_down_fails_fast_naming_the_endpoint(s3_env, monkeypatch):
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    t = time.monotonic()
    with pytest.raises(S3Unreachable) as err:
        read_s3_object("s3://bucket/data.jsonl")
    assert time.monotonic() - t < 30
    assert endpoint in str(err.value) and "AWS_ENDPOINT_URL" in str(err.value)


def test_connection_closed_before_any_answer_is_unreachable(s3_env, monkeypatch):
    with tcp_server(lambda conn: None) as endpoint:  # accepts the request, closes without a byte
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(S3Unreachable, match="did not answer"):
            read_s3_object("s3://bucket/data.jsonl")


def test_body_cut_off_mid_read_is_retried_then_unreachable(s3_env, monkeypatch):
    requests = []

    def half_a_body(conn: socket.socket) -> None:
        requests.append(1)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\nContent-Type: text/plain\r\n\r\n" + b"x" * 100)

    with tcp_server(half_a_body) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(S3Unreachable, match="dropped while reading"):
            read_s3_object("s3://bucket/data.jsonl")
    assert len(requests) == 3  # each attempt fetched the object again

"""Ranged reads, object info and listings from a real S3 server (SeaweedFS on loopback): the bytes of a
real safetensors file come back exactly, and every failure is a typed error naming what to fix."""

from __future__ import annotations

import hashlib
import json
import socket
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from rayquant.storage.s3_files import (
    S3AccessDenied,
    S3ObjectNotFound,
    S3Unreachable,
    list_s3_objects,
    parse_s3_prefix,
    read_s3_range,
    s3_client,
    s3_object_info,
)
from tests.storage.test_s3_files import tcp_server

BUCKET = "rayquant-s3-ranges"


@pytest.fixture
def bucket(s3_env) -> str:
    return s3_env.create_bucket(BUCKET)


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    """A real safetensors file with tensors of three dtypes, some not 8-byte sized."""
    g = torch.Generator().manual_seed(0)
    path = tmp_path / "model.safetensors"
    save_file({
        "embed.weight": torch.randn(64, 48, generator=g).to(torch.bfloat16),
        "blocks.0.attn.q_proj.weight": torch.randn(48, 48, generator=g),
        "blocks.0.norm.weight": torch.randn(7, generator=g).half(),
        "blocks.0.mlp.counts": torch.randint(0, 9, (3, 5), generator=g, dtype=torch.int32),
    }, str(path))
    return path


def tensor_ranges(data: bytes) -> dict[str, tuple[int, int]]:
    """Absolute [start, end) byte range of each tensor, from the file's own header."""
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    return {name: (8 + n + e["data_offsets"][0], 8 + n + e["data_offsets"][1])
            for name, e in header.items() if name != "__metadata__"}


def test_ranged_reads_return_exactly_the_tensor_bytes_of_a_safetensors_file(s3_env, bucket, model_file):
    data = model_file.read_bytes()
    s3_env.client().put_object(Bucket=bucket, Key="models/tiny/model.safetensors", Body=data)
    uri = f"s3://{bucket}/models/tiny/model.safetensors"

    (n,) = struct.unpack("<Q", read_s3_range(uri, 0, 8))
    assert read_s3_range(uri, 8, 8 + n) == data[8:8 + n]
    ranges = tensor_ranges(data)
    assert len(ranges) == 4
    for name, (start, end) in ranges.items():
        assert read_s3_range(uri, start, end) == data[start:end], name
    assert read_s3_range(uri, 0, len(data)) == data
    assert read_s3_range(uri, len(data) - 1, len(data)) == data[-1:]
    assert read_s3_range(uri, 5, 5) == b""


def test_object_info_gives_size_and_etag(s3_env, bucket, model_file):
    data = model_file.read_bytes()
    s3_env.client().put_object(Bucket=bucket, Key="info/model.safetensors", Body=data)
    info = s3_object_info(f"s3://{bucket}/info/model.safetensors")
    assert info.size == len(data)
    assert info.etag == hashlib.md5(data).hexdigest()  # a single PUT's ETag is its MD5, quotes stripped
    assert info.version_id is None  # the bucket is not versioned


def test_object_info_of_a_missing_key_or_bucket_says_which(s3_env, bucket):
    with pytest.raises(S3ObjectNotFound) as err:
        s3_object_info(f"s3://{bucket}/no/such.safetensors")
    assert "key not found" in str(err.value) and "calibration.dataset" not in str(err.value)
    with pytest.raises(S3ObjectNotFound, match="bucket not found"):
        s3_object_info("s3://rayquant-no-such-bucket/model.safetensors")


def test_listing_is_relative_to_the_prefix_and_stops_at_its_slash(s3_env, bucket):
    client = s3_env.client()
    for key, body in {"list/m/a.json": b"{}", "list/m/sub/b.bin": b"12345", "list/m-other/c.json": b"x"}.items():
        client.put_object(Bucket=bucket, Key=key, Body=body)
    found = list_s3_objects(f"s3://{bucket}/list/m")
    assert sorted(found) == ["a.json", "sub/b.bin"]
    assert found["sub/b.bin"].size == 5 and found["sub/b.bin"].etag == hashlib.md5(b"12345").hexdigest()
    assert sorted(list_s3_objects(f"s3://{bucket}/list/m/")) == ["a.json", "sub/b.bin"]
    assert {"list/m/a.json", "list/m-other/c.json"} <= set(list_s3_objects(f"s3://{bucket}"))
    assert list_s3_objects(f"s3://{bucket}/list/empty") == {}


def test_listing_a_missing_bucket_is_not_found(s3_env):
    with pytest.raises(S3ObjectNotFound, match="bucket not found") as err:
        list_s3_objects("s3://rayquant-no-such-bucket/prefix")
    assert "'rayquant-no-such-bucket'" in str(err.value)


def test_parse_s3_prefix_accepts_a_bare_bucket():
    assert parse_s3_prefix("s3://bucket") == parse_s3_prefix("s3://bucket/")
    assert (parse_s3_prefix("s3://bucket").bucket, parse_s3_prefix("s3://bucket").key) == ("bucket", "")
    assert parse_s3_prefix("s3://bucket/a/b/").key == "a/b"
    for bad in ("s3://", "s3:///prefix", "http://bucket/prefix"):
        with pytest.raises(ValueError):
            parse_s3_prefix(bad)


def test_a_range_past_the_end_or_backwards_is_refused(s3_env, bucket):
    s3_env.client().put_object(Bucket=bucket, Key="short.bin", Body=b"0123456789")
    with pytest.raises(ValueError, match="runs past the end of the object"):
        read_s3_range(f"s3://{bucket}/short.bin", 5, 30)
    with pytest.raises(ValueError, match="is not a range"):
        read_s3_range(f"s3://{bucket}/short.bin", 6, 5)


def test_a_missing_key_in_a_range_read_names_the_key(s3_env, bucket):
    with pytest.raises(S3ObjectNotFound, match="key not found"):
        read_s3_range(f"s3://{bucket}/no/such.safetensors", 0, 8)


def test_wrong_secret_names_the_variable_but_never_its_value(s3_env, bucket, monkeypatch):
    s3_env.client().put_object(Bucket=bucket, Key="secret.bin", Body=b"x" * 16)
    wrong_secret = "wrong-secret-5f3a9c1e"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", wrong_secret)
    for read in (lambda: read_s3_range(f"s3://{bucket}/secret.bin", 0, 8),
                 lambda: s3_object_info(f"s3://{bucket}/secret.bin"),
                 lambda: list_s3_objects(f"s3://{bucket}")):
        with pytest.raises(S3AccessDenied) as err:
            read()
        assert "AWS_SECRET_ACCESS_KEY" in str(err.value)
        assert wrong_secret not in str(err.value) and s3_env.secret_key not in str(err.value)


def test_one_client_serves_every_read_until_the_environment_changes(s3_env, monkeypatch):
    assert s3_client() is s3_client()
    first = s3_client()
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "another-secret")
    assert s3_client() is not first
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_env.secret_key)
    assert s3_client() is first


def test_a_short_body_is_fetched_again_then_unreachable(s3_env, monkeypatch):
    requests = []

    def five_of_ten_bytes(conn: socket.socket) -> None:  # a complete answer, just shorter than the range
        requests.append(1)
        conn.sendall(b"HTTP/1.1 206 Partial Content\r\nContent-Length: 5\r\nContent-Range: bytes 0-9/100\r\n"
                     b"Content-Type: application/octet-stream\r\n\r\n12345")

    with tcp_server(five_of_ten_bytes) as endpoint:
        monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
        with pytest.raises(S3Unreachable, match="5 of 10 bytes"):
            read_s3_range("s3://bucket/model.safetensors", 0, 10)
    assert len(requests) == 3  # each attempt asked for the range again

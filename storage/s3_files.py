"""Objects in S3, read with boto3 from the standard AWS environment: whole small objects (calibration
files, manifests), object metadata, listings under a prefix, and byte ranges (tensors of a source model).

The endpoint, credentials and region come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION (boto3 reads them itself, when a client is built); nothing else is
contacted. One client per process and set of AWS_* variables is cached: workers read thousands of ranges,
and a client costs milliseconds to build. botocore retries a request on connection errors, 5xx and
throttling; a body that breaks off mid-read, or comes back shorter than asked, is fetched again here,
since botocore cannot retry a response it already handed over.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import boto3
import structlog
from botocore.client import BaseClient
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionError as BotoConnectionError,
    HTTPClientError,
    IncompleteReadError,
    NoCredentialsError,
    ResponseStreamingError,
)

log = structlog.get_logger()

# attempts per request (botocore, connection errors and 5xx) and per body read (here); few, so a down
# endpoint fails in seconds instead of minutes
ATTEMPTS = 3
CONNECT_TIMEOUT_S = 5
READ_TIMEOUT_S = 60
# connections kept per client: the sink's parallel parts plus a worker's prefetch threads, without
# urllib3 discarding connections ("pool is full")
MAX_POOL_CONNECTIONS = 16
# where an error tells the user to look when the caller names no spec field
ANY_SPEC_FIELD = "the spec"

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}
_BROKEN_READ = (ResponseStreamingError, IncompleteReadError)

_clients: dict[tuple[int, str], BaseClient] = {}  # (pid, digest of the AWS_* variables) -> client
_clients_lock = threading.Lock()  # boto3 sessions are not thread-safe; the clients they build are


class S3ObjectNotFound(Exception):
    """The bucket or key of an s3:// URI does not exist."""


class S3Unreachable(Exception):
    """The S3 endpoint did not answer, or the connection dropped and kept dropping."""


class S3AccessDenied(Exception):
    """The S3 endpoint refused the credentials in the environment."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str  # "" for the whole bucket (a prefix)


@dataclass(frozen=True)
class S3ObjectInfo:
    size: int
    etag: str  # as S3 returns it, quotes stripped ("<md5>-<n parts>" for a multipart object)
    version_id: str | None  # None when the bucket is not versioned, and in listings


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/path/key` -> S3Location("bucket", "path/key").

    Raises:
        ValueError: the URI has no bucket or no key.
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return S3Location(bucket, key)


def parse_s3_prefix(uri: str) -> S3Location:
    """`s3://bucket` -> S3Location("bucket", ""); `s3://bucket/a/b/` -> S3Location("bucket", "a/b").

    Raises:
        ValueError: the URI is not s3:// or has no bucket.
    """
    bucket, _, prefix = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket:
        raise ValueError(f"{uri!r} is not an s3://bucket/prefix URI")
    return S3Location(bucket, prefix.strip("/"))


def s3_client() -> BaseClient:
    """This process's boto3 S3 client for the AWS_* variables set now (built on first use)."""
    # the variables are hashed into the key so that no secret sits readable in the cache
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith("AWS_"))
    key = (os.getpid(), hashlib.sha256(repr(settings).encode()).hexdigest())
    with _clients_lock:
        if key not in _clients:
            _clients[key] = boto3.session.Session().client("s3", config=Config(
                retries={"max_attempts": ATTEMPTS, "mode": "standard"},
                connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S,
                max_pool_connections=MAX_POOL_CONNECTIONS))
        return _clients[key]


def s3_error_code(err: ClientError) -> str:
    """The S3 error code of a failed request ("NoSuchKey", "PreconditionFailed", "404", ...)."""
    return str(err.response.get("Error", {}).get("Code", ""))


@contextmanager
def s3_errors(uri: str, spec_field: str = ANY_SPEC_FIELD, access: str = "read") -> Iterator[None]:
    """Turn boto3's exceptions inside the block into S3ObjectNotFound, S3AccessDenied or S3Unreachable.

    The messages name the URI, the endpoint and what to fix (`spec_field`, the AWS_* variables, the
    credentials' `access` permission), never a credential's value.
    """
    endpoint = s3_client().meta.endpoint_url
    try:
        yield
    except (BotoConnectionError, HTTPClientError) as err:
        raise S3Unreachable(
            f"{uri}: S3 endpoint {endpoint} did not answer after {ATTEMPTS} attempts ({type(err).__name__}); "
            "check that it is running and that AWS_ENDPOINT_URL points at it") from err
    except NoCredentialsError as err:
        raise S3AccessDenied(
            f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from err
    except ClientError as err:
        code = s3_error_code(err)
        status = int(err.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0)
        if code in _NOT_FOUND:
            raise s3_not_found(uri, spec_field, bucket_missing=code == "NoSuchBucket") from err
        if code in _DENIED:
            raise S3AccessDenied(
                f"{uri}: {endpoint} refused the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                f"AWS_SECRET_ACCESS_KEY and the key's {access} permission on bucket "
                f"{parse_s3_prefix(uri).bucket!r}") from err
        if status >= 500:  # botocore retried it already; the server's message may echo request headers
            raise S3Unreachable(
                f"{uri}: S3 endpoint {endpoint} failed with {code or status} after {ATTEMPTS} attempts; "
                "check the server's health and retry") from err
        raise  # a request the server found malformed: a bug here, not a fix the user can make
    except BotoCoreError as err:
        raise S3Unreachable(f"{uri}: talking to {endpoint} failed ({type(err).__name__}); check "
                            "AWS_ENDPOINT_URL and AWS_REGION") from err


def s3_not_found(uri: str, spec_field: str, bucket_missing: bool) -> S3ObjectNotFound:
    """The error for a missing bucket (bucket_missing) or key, naming what to check."""
    endpoint = s3_client().meta.endpoint_url
    if bucket_missing:
        return S3ObjectNotFound(
            f"{uri}: bucket not found at {endpoint}; create bucket {parse_s3_prefix(uri).bucket!r} or check "
            f"{spec_field} and AWS_ENDPOINT_URL")
    return S3ObjectNotFound(
        f"{uri}: key not found at {endpoint}; check the bucket and key in {spec_field} and AWS_ENDPOINT_URL")


def s3_bucket_exists(bucket: str) -> bool:
    """Whether `bucket` exists (a HEAD answers a bare 404 for a missing bucket and a missing key alike).

    Raises:
        ClientError: any answer but 404 (inside s3_errors: mapped).
    """
    try:
        s3_client().head_bucket(Bucket=bucket)
    except ClientError as err:
        if s3_error_code(err) in _NOT_FOUND:
            return False
        raise
    return True


def read_s3_object(uri: str, *, spec_field: str = "calibration.dataset") -> bytes:
    """The whole object at `uri` (s3://bucket/key).

    Raises:
        S3ObjectNotFound: no such bucket or key.
        S3AccessDenied: missing or rejected credentials.
        S3Unreachable: the endpoint is down, or the connection dropped on every attempt.
    """
    where = parse_s3_uri(uri)
    with s3_errors(uri, spec_field):
        return _get_body(uri, lambda: s3_client().get_object(Bucket=where.bucket, Key=where.key), None)


def s3_object_info(uri: str, *, spec_field: str = ANY_SPEC_FIELD) -> S3ObjectInfo:
    """Size, ETag and version of the object at `uri`, from one HEAD request.

    Raises:
        S3ObjectNotFound: no such bucket or key.
        S3AccessDenied: missing or rejected credentials.
        S3Unreachable: the endpoint is down.
    """
    where = parse_s3_uri(uri)
    with s3_errors(uri, spec_field):
        try:
            head = s3_client().head_object(Bucket=where.bucket, Key=where.key)
        except ClientError as err:
            if s3_error_code(err) not in _NOT_FOUND:
                raise
            raise s3_not_found(uri, spec_field, bucket_missing=not s3_bucket_exists(where.bucket)) from err
    return S3ObjectInfo(head["ContentLength"], head["ETag"].strip('"'), head.get("VersionId"))


def list_s3_objects(prefix_uri: str, *, spec_field: str = ANY_SPEC_FIELD) -> dict[str, S3ObjectInfo]:
    """Every object under `prefix_uri` (s3://bucket or s3://bucket/prefix), keyed by its key relative to
    the prefix ("a/b/c.json" under s3://bucket/a is "b/c.json"); {} when there is none.

    Raises:
        S3ObjectNotFound: no such bucket.
        S3AccessDenied: missing or rejected credentials.
        S3Unreachable: the endpoint is down.
    """
    where = parse_s3_prefix(prefix_uri)
    start = f"{where.key}/" if where.key else ""  # "a/" so that s3://bucket/a never lists a-other/
    found: dict[str, S3ObjectInfo] = {}
    with s3_errors(prefix_uri, spec_field):
        for page in s3_client().get_paginator("list_objects_v2").paginate(Bucket=where.bucket, Prefix=start):
            for entry in page.get("Contents", []):
                found[entry["Key"][len(start):]] = S3ObjectInfo(entry["Size"], entry["ETag"].strip('"'), None)
    return found


def read_s3_range(uri: str, start: int, end: int, *, spec_field: str = ANY_SPEC_FIELD) -> bytes:
    """Bytes [start, end) of the object at `uri`, from one ranged GET.

    Raises:
        ValueError: the range is empty-backwards, negative, or runs past the end of the object.
        S3ObjectNotFound: no such bucket or key.
        S3AccessDenied: missing or rejected credentials.
        S3Unreachable: the endpoint is down, or the body came back short on every attempt.
    """
    if not 0 <= start <= end:
        raise ValueError(f"{uri}: byte range [{start}, {end}) is not a range")
    if start == end:
        return b""
    where = parse_s3_uri(uri)

    def fetch() -> dict:
        response = s3_client().get_object(Bucket=where.bucket, Key=where.key, Range=f"bytes={start}-{end - 1}")
        size = int(response.get("ContentRange", "/0").rpartition("/")[2] or 0)
        if size and end > size:  # S3 answers a range past the end with what there is
            raise ValueError(f"{uri}: byte range [{start}, {end}) runs past the end of the object "
                             f"({size} bytes); the object changed or is not the file that was indexed")
        return response

    with s3_errors(uri, spec_field):
        return _get_body(uri, fetch, end - start)


def _get_body(uri: str, get: Callable[[], dict], expected_bytes: int | None) -> bytes:
    """The body of `get()`'s response, fetched again when it breaks off or is not expected_bytes long."""
    for attempt in range(1, ATTEMPTS + 1):
        try:
            body = get()["Body"].read()
            if expected_bytes is None or len(body) == expected_bytes:
                return body
            failure = f"{len(body)} of {expected_bytes} bytes"
        except _BROKEN_READ as err:
            failure = type(err).__name__
        if attempt < ATTEMPTS:
            log.info("s3_read_retry", uri=uri, attempt=attempt, error=failure)
            time.sleep(0.5 * attempt)
    raise S3Unreachable(
        f"{uri}: the connection to {s3_client().meta.endpoint_url} dropped while reading the object, "
        f"{ATTEMPTS} times ({failure}); check the network path to the endpoint and retry")

"""Whole small objects from S3 (calibration files), read with boto3 from the standard AWS environment.

The endpoint, credentials and region come from AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY and AWS_REGION (boto3 reads them itself, at call time); nothing else is
contacted. botocore retries the request on connection errors and throttling; a body that breaks off
mid-read is fetched again here, since botocore cannot retry a response it already handed over.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import boto3
import structlog
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

_NOT_FOUND = {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}
_DENIED = {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"}


class S3ObjectNotFound(Exception):
    """The bucket or key of an s3:// URI does not exist."""


class S3Unreachable(Exception):
    """The S3 endpoint did not answer, or the connection dropped and kept dropping."""


class S3AccessDenied(Exception):
    """The S3 endpoint refused the credentials in the environment."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    key: str


def parse_s3_uri(uri: str) -> S3Location:
    """`s3://bucket/path/key` -> S3Location("bucket", "path/key").

    Raises:
        ValueError: the URI has no bucket or no key.
    """
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not uri.startswith("s3://") or not bucket or not key:
        raise ValueError(f"{uri!r} is not an s3://bucket/key URI")
    return S3Location(bucket, key)


def read_s3_object(uri: str) -> bytes:
    """The whole object at `uri` (s3://bucket/key).

    Raises:
        S3ObjectNotFound: no such bucket or key.
        S3AccessDenied: missing or rejected credentials.
        S3Unreachable: the endpoint is down, or the connection dropped on every attempt.
    """
    where = parse_s3_uri(uri)
    client = boto3.session.Session().client("s3", config=Config(
        retries={"max_attempts": ATTEMPTS, "mode": "standard"},
        connect_timeout=CONNECT_TIMEOUT_S, read_timeout=READ_TIMEOUT_S))
    endpoint = client.meta.endpoint_url
    for attempt in itertools.count(1):
        try:
            response = client.get_object(Bucket=where.bucket, Key=where.key)
            return response["Body"].read()
        except (ResponseStreamingError, IncompleteReadError) as err:
            if attempt == ATTEMPTS:
                raise S3Unreachable(
                    f"{uri}: the connection to {endpoint} dropped while reading the object, {ATTEMPTS} times "
                    f"({type(err).__name__}); check the network path to the endpoint and retry") from err
            log.info("s3_read_retry", uri=uri, attempt=attempt, error=type(err).__name__)
            time.sleep(0.5 * attempt)
        except (BotoConnectionError, HTTPClientError) as err:
            raise S3Unreachable(
                f"{uri}: S3 endpoint {endpoint} did not answer after {ATTEMPTS} attempts ({type(err).__name__}); "
                "check that it is running and that AWS_ENDPOINT_URL points at it") from err
        except NoCredentialsError as err:
            raise S3AccessDenied(
                f"{uri}: no S3 credentials found; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY") from err
        except ClientError as err:
            code = str(err.response.get("Error", {}).get("Code", ""))
            if code in _NOT_FOUND:
                raise S3ObjectNotFound(
                    f"{uri}: {'bucket' if code == 'NoSuchBucket' else 'key'} not found at {endpoint}; check "
                    "calibration.dataset (bucket and key) and AWS_ENDPOINT_URL") from err
            if code in _DENIED:
                raise S3AccessDenied(
                    f"{uri}: {endpoint} refused the credentials ({code}); check AWS_ACCESS_KEY_ID and "
                    "AWS_SECRET_ACCESS_KEY and the key's read permission on the bucket") from err
            raise  # a server-side failure, not a fix the user can make in the spec
        except BotoCoreError as err:
            raise S3Unreachable(f"{uri}: reading from {endpoint} failed ({err}); check AWS_ENDPOINT_URL and "
                                "AWS_REGION") from err

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3_server import S3Server, run_s3_server

# Embedded Ray must stay on loopback; the synthetic model cache is shared by the whole session.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session", autouse=True)
def synthetic_cache(tmp_path_factory) -> Path:
    cache = Path(os.environ.get("RAYQUANT_TEST_CACHE") or tmp_path_factory.mktemp("rayquant-cache"))
    os.environ["RAYQUANT_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[S3Server]:
    """A real S3 endpoint (SeaweedFS `weed mini` on 127.0.0.1), one per session; see tests/s3_server.py."""
    with run_s3_server(tmp_path_factory.mktemp("s3-server")) as server:
        yield server


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch) -> S3Server:
    """The AWS_* variables of `s3_server` set in this process for one test (boto3 reads them per client)."""
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(key, raising=False)
    return s3_server

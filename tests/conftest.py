import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hub_server import HubServer, run_hub_server
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


@pytest.fixture(scope="session")
def hub_server() -> Iterator[HubServer]:
    """A local Hugging Face Hub (tests/hub_server.py on 127.0.0.1), one per session."""
    with run_hub_server() as server:
        yield server


@pytest.fixture
def hub_env(hub_server: HubServer, monkeypatch, tmp_path: Path) -> HubServer:
    """The HF_* variables of `hub_server` and an empty HF_HOME set in this process for one test.

    huggingface_hub copies HF_HUB_OFFLINE, HF_HUB_DISABLE_TELEMETRY, HF_HUB_DISABLE_XET and the token
    file's path into its constants when imported, so those copies are set too, as a process started with
    these variables would have them. Xet is off because the local Hub serves LFS only: with hf_xet
    installed the client uploads through Xet unless told not to.
    """
    from huggingface_hub import constants

    home = tmp_path / "hf-home"
    for key, value in hub_server.env(home).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    return hub_server

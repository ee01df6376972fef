"""A real Ray head for the submission tests: `ray start --head --block` on 127.0.0.1, token auth on.

The head runs in a session of its own, with its own temp dir, free loopback ports and a random token
(RAY_AUTH_MODE=token, RAY_AUTH_TOKEN: the user's ~/.ray is neither read nor written). Jobs it runs
inherit its environment: this interpreter's bin directory first on PATH (so `rayquant` is this
checkout's), the session's RAYQUANT_CACHE and what the caller adds (the S3 server's credentials).
`--metrics-export-port` is a free port of its own: the node's metrics in Prometheus text. Without the
dashboard (`dashboard=False`: no Jobs API, as tests/bench/job_bench.py's standing cluster needs none) it
is ready once `ray start` says so. Stopped by
SIGTERM to the `ray start` process (which shuts its Ray processes down), then SIGKILL to its process
group if any is left.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import requests

START_TIMEOUT_S = 90


@dataclass(frozen=True)
class RayHead:
    address: str  # the Jobs API: http://127.0.0.1:<dashboard port>
    gcs_address: str  # what `ray.init` and cluster.address take: 127.0.0.1:<GCS port>
    token: str
    temp_dir: Path
    metrics_port: int  # Prometheus text of the node's metrics agent: http://127.0.0.1:<port>/metrics

    def env(self) -> dict[str, str]:
        """What a client of this head needs in its environment."""
        return {"RAY_AUTH_TOKEN": self.token}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _head_command(head: RayHead, dashboard_port: int, num_cpus: int, dashboard: bool) -> list[str]:
    ports = {"--port": int(head.gcs_address.rsplit(":", 1)[1]), "--dashboard-port": dashboard_port, "--ray-client-server-port": free_port(),
             "--dashboard-agent-listen-port": free_port(), "--dashboard-agent-grpc-port": free_port(),
             "--metrics-export-port": head.metrics_port, "--node-manager-port": free_port(),
             "--object-manager-port": free_port(), "--runtime-env-agent-port": free_port()}
    ray = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` script, where no bin/ holds it
    return [*ray, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
            f"--include-dashboard={str(dashboard).lower()}", f"--num-cpus={num_cpus}", f"--temp-dir={head.temp_dir}",
            "--disable-usage-stats", *(f"{flag}={port}" for flag, port in ports.items())]


def _wait_ready(proc: subprocess.Popen, head: RayHead, log: Path, dashboard: bool) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if not dashboard:
            if "Ray runtime started" in log.read_text(errors="replace"):
                return
            time.sleep(0.2)
            continue
        try:
            answer = requests.get(f"{head.address}/api/jobs/", timeout=2,
                                  headers={"Authorization": f"Bearer {head.token}"})
            if answer.status_code == 200:
                return
        except requests.RequestException:
            pass  # not listening yet
        time.sleep(0.5)
    raise RuntimeError(f"the Ray head did not start within {START_TIMEOUT_S} s:\n{log.read_text()[-3000:]}")


@contextmanager
def run_ray_head(num_cpus: int = 2, env: dict[str, str] | None = None, dashboard: bool = True) -> Iterator[RayHead]:
    """A head whose processes, and so its jobs, also get `env` (e.g. the S3 server's credentials, as a
    cluster's nodes get them from Kubernetes Secrets)."""
    # a short path: Ray's unix sockets live under it (at most 107 bytes)
    temp_dir = Path(tempfile.mkdtemp(prefix="rq-ray-", dir="/tmp"))
    dashboard_port = free_port()
    head = RayHead(address=f"http://127.0.0.1:{dashboard_port}", gcs_address=f"127.0.0.1:{free_port()}", token=secrets.token_hex(32), temp_dir=temp_dir,
                   metrics_port=free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")} | (env or {})
    env |= {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": head.token, "RAY_USAGE_STATS_ENABLED": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    log = temp_dir / "ray-start.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(_head_command(head, dashboard_port, num_cpus, dashboard), env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_ready(proc, head, log, dashboard)
        yield head
    finally:
        _stop(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # the session started for it: whatever of it is left
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)

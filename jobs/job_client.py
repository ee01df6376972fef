"""The connection to a Ray cluster's Jobs API: which address, which token, and errors a user can act on.

The address comes from `--address`, else the spec's `cluster.address`, else `RAY_ADDRESS`. Ray's own
client lets RAY_ADDRESS (and RAY_API_SERVER_ADDRESS) override the address it is given; here the
order above holds, so those variables are hidden from it while it connects.

Token authentication (on by default in Ray 2.60): the token is read as Ray's own loader reads it —
`RAY_AUTH_TOKEN`, else the file at `RAY_AUTH_TOKEN_PATH`, else `~/.ray/auth_token` — and sent as the
`Authorization: Bearer` header on every request. The token never appears in a message.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

CONNECT_TIMEOUT_S = 5.0  # the first request to the address; an unreachable one fails within this
DASHBOARD_PORT = 8265  # Ray's default Jobs API (dashboard) port, used for a ray:// or bare host address


class NoClusterAddress(Exception):
    """Neither --address, the spec's cluster.address nor RAY_ADDRESS names a cluster."""


class ClusterUnreachable(Exception):
    """Nothing answers at the cluster's Jobs API address."""


class ClusterAuthFailed(Exception):
    """The cluster refused the token (or wants one and none was found)."""


@dataclass(frozen=True)
class ClusterAddress:
    """Where the Jobs API answers, and which setting named it (for messages)."""

    url: str  # http(s)://host:port of the Jobs API (Ray's dashboard)
    named_by: str  # "--address", "cluster.address" or "RAY_ADDRESS"


@dataclass(frozen=True)
class ClusterToken:
    value: str
    source: str  # where it was read: "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH (<path>)" or the default file


def cluster_address(flag: str | None, spec_address: str | None, env: Mapping[str, str]) -> ClusterAddress:
    """The Jobs API address: --address, else the spec's cluster.address, else RAY_ADDRESS.

    Raises:
        NoClusterAddress: none of them is set.
    """
    for value, named_by in ((flag, "--address"), (spec_address, "cluster.address"),
                            (env.get("RAY_ADDRESS"), "RAY_ADDRESS")):
        if value and value != "auto":  # "auto" (a spec run inside the cluster) names no address from outside
            return ClusterAddress(url=jobs_api_url(value), named_by=named_by)
    raise NoClusterAddress("no Ray cluster named: pass --address http://HEAD:8265, set cluster.address "
                           "in the spec, or set RAY_ADDRESS")


def jobs_api_url(address: str) -> str:
    """http(s)://host:port as given; ray://host:port and a bare host[:port] go to the dashboard's port on that host."""
    address = address.rstrip("/")
    scheme, sep, rest = address.partition("://")
    if sep and scheme in ("http", "https"):
        return address
    host = urlsplit(f"//{rest if sep else address}").hostname or "127.0.0.1"
    return f"http://{host}:{DASHBOARD_PORT}"


def cluster_token(env: Mapping[str, str], home: Path) -> ClusterToken | None:
    """The cluster's token, found where Ray's own loader looks; None if there is none."""
    if env.get("RAY_AUTH_TOKEN"):
        return ClusterToken(env["RAY_AUTH_TOKEN"].strip(), "RAY_AUTH_TOKEN")
    path_var = env.get("RAY_AUTH_TOKEN_PATH")
    path = Path(path_var) if path_var else home / ".ray" / "auth_token"
    if path.is_file() and path.read_text().strip():
        return ClusterToken(path.read_text().strip(), f"RAY_AUTH_TOKEN_PATH ({path})" if path_var else str(path))
    return None


def connect_jobs_api(address: ClusterAddress, token: ClusterToken | None):
    """A `JobSubmissionClient` for `address`, checked with one request (reachable, token accepted).

    Raises:
        ClusterUnreachable: nothing answers at the address within CONNECT_TIMEOUT_S.
        ClusterAuthFailed: the cluster refused the token or wants one.
    """
    import requests

    headers = {"Authorization": f"Bearer {token.value}"} if token is not None else {}
    try:
        answer = requests.get(f"{address.url}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as err:
        raise ClusterUnreachable(
            f"no Ray Jobs API answers at {address.url} (from {address.named_by}): {type(err).__name__}; "
            "check the address (the head's dashboard, default port 8265) and that the cluster is up") from None
    _check_answer(answer.status_code, address, token)
    from ray.job_submission import JobSubmissionClient

    with _without_env("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):  # else Ray's client prefers them to `url`
        return JobSubmissionClient(address.url, headers=headers)


def _check_answer(status_code: int, address: ClusterAddress, token: ClusterToken | None) -> None:
    if status_code in (401, 403):
        got = f"refused the token from {token.source}" if token is not None else "requires a token and none was found"
        raise ClusterAuthFailed(
            f"the Ray cluster at {address.url} {got} (HTTP {status_code}); set RAY_AUTH_TOKEN to the cluster's "
            "token (`ray get-auth-token` on its head node) or RAY_AUTH_TOKEN_PATH to a file holding it")
    if status_code != 200:
        raise ClusterUnreachable(
            f"{address.url} (from {address.named_by}) answered HTTP {status_code} to /api/version: it is not a "
            "Ray Jobs API; pass the head's dashboard address (default port 8265)")


@contextlib.contextmanager
def _without_env(*names: str) -> Iterator[None]:
    saved = {name: os.environ.pop(name) for name in names if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


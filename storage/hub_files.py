"""Model files on the Hugging Face Hub (hf://org/name[@revision]), read with huggingface_hub's own client.

The endpoint and the token come from HF_ENDPOINT and HF_TOKEN (else a saved `hf auth login`), read at
call time: huggingface_hub reads the token per request but copies HF_ENDPOINT into its constants when it
is imported, so the endpoint is passed to it explicitly on every call. Requests go through its shared
session (`get_session`: one connection pool per process, reused by the thousands of ranged reads a
worker makes), its headers (`build_hf_headers`: token, user agent) and its retries (`http_backoff`:
connection errors, 429 and 5xx). The resolve endpoint redirects LFS files to a CDN: the session follows
redirects with the Range header kept and, to another origin, the Authorization header dropped, so the
token never leaves the Hub. A body that arrives shorter than the range asked for is fetched again here.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path, PurePosixPath

import structlog
from huggingface_hub import HfApi, get_token, hf_hub_url
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    LocalTokenNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, hf_raise_for_status, http_backoff, validate_repo_id
from huggingface_hub.utils import httpx as hub_httpx  # huggingface_hub's HTTP library, whatever its version

from rayquant.storage.atomic_files import write_atomic

log = structlog.get_logger()

DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_BRANCH = "main"
# attempts per request (http_backoff: connection errors, 429, 5xx) and per short body (here); few and
# short waits, so a down endpoint fails in seconds instead of the client's default half minute
ATTEMPTS = 3
RETRY_WAIT_S = 0.5
TIMEOUT_S = 60  # per request: connect, and each read of the body
SOURCE_FIELD = "model.source"

_URI = re.compile(r"hf://(?P<repo>[^/@]+/[^/@]+)(?:@(?P<rev>[^@]+))?")


class HubRepoNotFound(Exception):
    """The repo of an hf:// URI does not exist, or is private and the token cannot see it."""


class HubRevisionNotFound(Exception):
    """The branch, tag or commit after '@' does not exist in the repo."""


class HubFileNotFound(FileNotFoundError):
    """The repo has no such file at that commit."""


class HubAccessDenied(Exception):
    """The Hub refused the token in HF_TOKEN (or there is none), or the token lacks the access needed."""


class HubUnreachable(Exception):
    """The Hub (HF_ENDPOINT) did not answer, failed, or kept cutting bodies short."""


def hub_endpoint() -> str:
    """HF_ENDPOINT as set now, else the public Hub."""
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_api() -> HfApi:
    """huggingface_hub's API client for the endpoint set now; it reads the token per request."""
    return HfApi(endpoint=hub_endpoint())


def parse_hub_uri(uri: str) -> tuple[str, str | None]:
    """`hf://org/name@rev` -> ("org/name", "rev"); `hf://org/name` -> ("org/name", None).

    Raises:
        ValueError: not an hf://org/name[@revision] URI, or not a valid repo id.
    """
    match = _URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"{uri!r} is not an hf://org/name[@revision] URI")
    try:
        validate_repo_id(match["repo"])
    except HFValidationError as err:
        raise ValueError(f"{uri!r}: {match['repo']!r} is not a valid Hub repo id ({err})") from err
    return match["repo"], match["rev"]


def resolve_hub_revision(repo_id: str, revision: str | None) -> str:
    """The commit sha (40 hex) that `revision` (a branch, tag or sha; None: main) points at now.

    Raises:
        HubRepoNotFound, HubRevisionNotFound, HubAccessDenied, HubUnreachable.
    """
    revision = revision or DEFAULT_BRANCH
    with hub_errors(repo_id, revision):
        return hub_api().model_info(repo_id, revision=revision, timeout=TIMEOUT_S).sha


def list_hub_files(repo_id: str, sha: str) -> dict[str, int]:
    """Every file of the repo at commit `sha` -> its size in bytes (an LFS file's real size).

    Raises:
        HubRepoNotFound, HubRevisionNotFound, HubAccessDenied, HubUnreachable.
    """
    with hub_errors(repo_id, sha):
        info = hub_api().model_info(repo_id, revision=sha, files_metadata=True, timeout=TIMEOUT_S)
    return {f.rfilename: f.lfs.size if f.lfs else f.size for f in info.siblings or []}


def read_hub_file(repo_id: str, sha: str, filename: str) -> bytes:
    """The whole of a small file (config, tokenizer, manifest) at commit `sha`, in memory.

    Raises:
        HubFileNotFound, HubRepoNotFound, HubRevisionNotFound, HubAccessDenied, HubUnreachable.
    """
    return _get(repo_id, sha, filename, {})


def download_hub_file(repo_id: str, sha: str, filename: str, dest_dir: Path) -> Path:
    """`filename` at commit `sha` written atomically to dest_dir/filename; returns that path.

    Raises:
        ValueError: filename is absolute or climbs out of dest_dir.
        HubFileNotFound, HubRepoNotFound, HubRevisionNotFound, HubAccessDenied, HubUnreachable.
    """
    relative = PurePosixPath(filename)
    if relative.is_absolute() or ".." in relative.parts:
        raise ValueError(f"hf://{repo_id}@{sha}: file name {filename!r} would be written outside {dest_dir}")
    data = read_hub_file(repo_id, sha, filename)
    target = Path(dest_dir) / relative
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(target.parent, target, lambda path: path.write_bytes(data))
    return target


def read_hub_range(repo_id: str, sha: str, filename: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of `filename` at commit `sha`, with one HTTP Range request (plus retries).

    Raises:
        ValueError: start < 0 or end < start.
        HubFileNotFound, HubRepoNotFound, HubRevisionNotFound, HubAccessDenied.
        HubUnreachable: the endpoint is down, or the body came back short on every attempt.
    """
    if start < 0 or end < start:
        raise ValueError(f"hf://{repo_id}@{sha}/{filename}: invalid byte range [{start}, {end})")
    if end == start:
        return b""
    wanted = end - start
    for attempt in range(1, ATTEMPTS + 1):
        body = _get(repo_id, sha, filename, {"Range": f"bytes={start}-{end - 1}"})
        if len(body) == wanted:
            return body
        log.info("hub_read_short", repo=repo_id, file=filename, attempt=attempt, got=len(body), wanted=wanted)
        if attempt < ATTEMPTS:
            time.sleep(RETRY_WAIT_S * attempt)
    raise HubUnreachable(
        f"hf://{repo_id}@{sha}/{filename}: asked {hub_endpoint()} for bytes [{start}, {end}) and got {len(body)} "
        f"bytes, {ATTEMPTS} times; check the network path to the Hub (and HF_ENDPOINT if it names a mirror) "
        "and retry")


def _get(repo_id: str, sha: str, filename: str, headers: dict[str, str]) -> bytes:
    """One GET of the file's resolve URL through huggingface_hub's session (redirects followed)."""
    url = hf_hub_url(repo_id, filename, revision=sha, endpoint=hub_endpoint())
    with hub_errors(repo_id, sha, filename):
        response = http_backoff("GET", url, headers=build_hf_headers(headers=headers), timeout=TIMEOUT_S,
                                max_retries=ATTEMPTS - 1, base_wait_time=RETRY_WAIT_S)
        hf_raise_for_status(response)
        return response.content


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, filename: str | None = None,
               spec_field: str = SOURCE_FIELD, access: str = "read") -> Iterator[None]:
    """Turn huggingface_hub's exceptions inside the block into the Hub* errors above.

    The messages name the repo, the endpoint and what to fix (`spec_field`, HF_TOKEN and its `access`,
    HF_ENDPOINT), never the token's value.
    """
    where = f"hf://{repo_id}" + (f"@{revision}" if revision else "") + (f"/{filename}" if filename else "")
    endpoint = hub_endpoint()
    try:
        yield
    except OfflineModeIsEnabled as err:
        raise HubUnreachable(f"{where}: HF_HUB_OFFLINE is set, so huggingface_hub sends no request; unset "
                             "HF_HUB_OFFLINE to use hf:// models and outputs") from err
    except GatedRepoError as err:
        raise HubAccessDenied(f"{where}: the repo is gated; accept its conditions at {endpoint}/{repo_id} with "
                              "the account whose token HF_TOKEN holds") from err
    except RepositoryNotFoundError as err:
        raise HubRepoNotFound(
            f"{where}: no model repo {repo_id!r} at {endpoint}, or it is private and {_token_state()} cannot see "
            f"it; check the repo id in {spec_field} (and HF_ENDPOINT), or set HF_TOKEN to a token that can "
            f"{access} it") from err
    except RevisionNotFoundError as err:
        raise HubRevisionNotFound(
            f"{where}: repo {repo_id!r} has no branch, tag or commit {revision!r}; fix the revision after '@' in "
            f"{spec_field}, or leave it out for {DEFAULT_BRANCH}") from err
    except RemoteEntryNotFoundError as err:
        raise HubFileNotFound(f"{where}: no such file in the repo at this revision") from err
    except LocalTokenNotFoundError as err:
        raise HubAccessDenied(f"{where}: no Hugging Face token; set HF_TOKEN to a token that can {access} "
                              f"{repo_id}") from err
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else 0
        if status in (401, 403):
            raise HubAccessDenied(
                f"{where}: {endpoint} refused the request (HTTP {status}) made with {_token_state()}; set HF_TOKEN "
                f"to a valid token that can {access} {repo_id}") from err
        if status >= 500:  # http_backoff retried it already
            raise HubUnreachable(f"{where}: {endpoint} failed with HTTP {status} after {ATTEMPTS} attempts; retry "
                                 "later, or check HF_ENDPOINT") from err
        raise  # a request the Hub found malformed: a bug here, not a fix the user can make
    except hub_httpx.RequestError as err:  # connection refused or dropped, timeouts, redirect loops
        raise HubUnreachable(f"{where}: the Hub at {endpoint} did not answer ({type(err).__name__}); check the "
                             "network and HF_ENDPOINT") from err


def _token_state() -> str:
    """Which token the requests carried, for messages: never its value."""
    if os.environ.get("HF_TOKEN"):
        return "the token in HF_TOKEN"
    if get_token() is not None:
        return "the saved Hugging Face login (HF_TOKEN is not set)"
    return "no token (HF_TOKEN is not set)"

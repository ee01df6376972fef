"""Ranged reads of a remote file by its location string, for tensors of remote model sources.

A location is what storage/remote_model.py puts in TensorInfo.file for a remote shard:
`s3://bucket/key` (read with boto3, storage/s3_files.py) or `hf://org/name@<commit sha>/path`
(read over HTTP through huggingface_hub, storage/hub_files.py). Pinning the Hub location to a commit
sha keeps every worker on the revision the driver resolved, whatever the branch does meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class HubLocation:
    repo_id: str  # org/name
    sha: str  # commit sha
    path: str  # file path inside the repo


def hub_location(repo_id: str, sha: str, path: str) -> str:
    return f"hf://{repo_id}@{sha}/{path}"


def parse_hub_location(location: str) -> HubLocation:
    """`hf://org/name@sha/dir/file` -> HubLocation("org/name", "sha", "dir/file").

    Raises:
        ValueError: not a pinned hf:// file location.
    """
    repo_id, at, rest = location.removeprefix("hf://").partition("@")
    sha, slash, path = rest.partition("/")
    if not location.startswith("hf://") or not (at and slash and repo_id and sha and path):
        raise ValueError(f"{location!r} is not an hf://org/name@sha/path location")
    return HubLocation(repo_id, sha, path)


def read_range(location: str, start: int, end: int) -> bytes:
    """Bytes [start, end) of the file at `location` (s3:// or pinned hf://).

    Raises:
        ValueError: an unknown scheme.
        the storage errors of s3_files / hub_files (not found, access denied, unreachable).
    """
    if location.startswith("s3://"):
        from rayquant.storage.s3_files import read_s3_range

        return read_s3_range(location, start, end)
    if location.startswith("hf://"):
        from rayquant.storage.hub_files import read_hub_range

        where = parse_hub_location(location)
        return read_hub_range(where.repo_id, where.sha, where.path, start, end)
    raise ValueError(f"{location!r}: no reader for this location (s3:// and hf:// are known)")

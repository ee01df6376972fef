"""Where a finished checkpoint is published: the sink of a remote output.uri (s3://, hf://).

A remote output is built in a local work directory exactly like a local output (storage/staging.py,
storage/finished_checkpoint.py); its sink uploads each shard as soon as it closes, while later blocks
run, and publishes the rest with the manifest last, so a reader of the target never finds a manifest
before every file it lists. Every sink has the same four steps:

    check_writable()          preflight, before any work: reachable, credentials accepted, target exists
    published_manifest()      the manifest already at the target (same job: done; another job: refused)
    upload_file(path, name, sha256)   one closed shard, now (idempotent: a rerun uploads only what is missing)
    publish(dir, files)       everything not yet uploaded, then the manifest: the commit
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol


class Sink(Protocol):
    uri: str

    def check_writable(self) -> None: ...

    def published_manifest(self) -> dict | None: ...

    def upload_file(self, local: Path, name: str, sha256: str) -> None: ...

    def publish(self, local_dir: Path, files: list[str], manifest_name: str = ...) -> None: ...


REMOTE_SCHEMES = ("s3", "hf")


def is_remote(uri: str) -> bool:
    return uri.partition("://")[0] in REMOTE_SCHEMES and "://" in uri


def open_sink(uri: str) -> Sink | None:
    """The sink of a remote output.uri; None for a local directory (written in place)."""
    if uri.startswith("s3://"):
        from rayquant.storage.s3_sink import S3Sink  # boto3 only when publishing to S3

        return S3Sink(uri)
    if uri.startswith("hf://"):
        from rayquant.storage.hub_sink import HubSink  # huggingface_hub only when publishing to the Hub

        return HubSink(uri)
    return None


def parse_published_manifest(body: bytes, uri: str, manifest_name: str, conflict: type[Exception], fix: str) -> dict:
    """The manifest found at a sink's target, parsed; `conflict` (naming `fix`) if rayquant did not write it."""
    try:
        manifest = json.loads(body)
    except ValueError:
        manifest = None
    if not isinstance(manifest, dict) or "job_fingerprint" not in manifest:
        raise conflict(f"output.uri {uri} holds a {manifest_name} that rayquant did not write; {fix}")
    return manifest

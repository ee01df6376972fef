"""Publishing a checkpoint under s3://bucket/prefix: files as they close, the manifest last as the commit.

Every file goes to its final key: S3 makes an object visible only once its upload completes (a multipart
upload is one atomic CompleteMultipartUpload), so a reader never sees half a file, and an upload that
fails is aborted (s3transfer does it; when the endpoint is gone, `check_writable` of the next run aborts
what is left). Parts carry SHA-256 checksums that S3 verifies; each object carries the whole file's
sha256 as metadata, so a rerun skips what is already there. The manifest is created with a conditional
write (If-None-Match: *): of two jobs publishing to one prefix, exactly one creates it, and the other
finds out whether it holds the same model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import structlog
from botocore.exceptions import ClientError
from s3transfer.manager import TransferConfig, TransferManager

from rayquant.storage.atomic_files import file_entry
from rayquant.storage.output_claims import CONTROL_FILES
from rayquant.storage.output_layout import MANIFEST_FILE
from rayquant.storage.s3_files import (
    ATTEMPTS,
    list_s3_objects,
    parse_s3_prefix,
    s3_bucket_exists,
    s3_client,
    s3_error_code,
    s3_errors,
    s3_not_found,
)
from rayquant.storage.sinks import parse_published_manifest

log = structlog.get_logger()

MiB = 2**20
# part size and multipart threshold: 64 MiB keeps a 4 GiB shard at 64 parts (S3 allows 10,000, each
# >= 5 MiB) while a failed part costs little to send again
PART_BYTES = 64 * MiB
# parts in flight per file; their buffers are read from the file as sent, so memory stays small
CONCURRENT_PARTS = 8
SPEC_FIELD = "output.uri"

_MISSING = {"404", "NoSuchKey", "NotFound"}
_EXISTS = {"PreconditionFailed", "412"}
_IN_PROGRESS = {"ConditionalRequestConflict", "409"}  # another conditional write to the key is finishing
_UNSUPPORTED = {"NotImplemented", "501"}
_FIX_CONFLICT = "choose another output.uri or delete the objects under it"


class S3OutputConflict(Exception):
    """output.uri names an S3 prefix that holds another model's manifest, or objects of no rayquant output."""


class S3Sink:
    """A checkpoint published under one s3://bucket/prefix (the prefix may be empty)."""

    def __init__(self, uri: str):
        self.uri = uri.rstrip("/")
        self._where = parse_s3_prefix(uri)

    def published_manifest(self) -> dict | None:
        """The rayquant-manifest.json at the target, parsed; None if there is none.

        Raises:
            S3OutputConflict: the object there is not a manifest rayquant wrote.
            S3ObjectNotFound, S3AccessDenied, S3Unreachable: the bucket or endpoint cannot be used.
        """
        return self._read_manifest(MANIFEST_FILE)

    def check_writable(self) -> None:
        """Preflight before any work: the bucket exists, the credentials are accepted, the endpoint answers;
        aborts the multipart uploads an earlier, crashed run left under the prefix.

        Raises:
            S3ObjectNotFound: the bucket does not exist.
            S3AccessDenied: missing or rejected credentials.
            S3Unreachable: the endpoint is down.
        """
        client = s3_client()
        start = f"{self._where.key}/" if self._where.key else ""
        with s3_errors(self.uri, SPEC_FIELD, access="write"):
            # a PUT into a missing bucket creates it on some servers (SeaweedFS): ask first
            if not s3_bucket_exists(self._where.bucket):
                raise s3_not_found(self.uri, SPEC_FIELD, bucket_missing=True)
            pages = client.get_paginator("list_multipart_uploads").paginate(Bucket=self._where.bucket, Prefix=start)
            stale = [(u["Key"], u["UploadId"]) for page in pages for u in page.get("Uploads", [])]
            for key, upload_id in stale:
                client.abort_multipart_upload(Bucket=self._where.bucket, Key=key, UploadId=upload_id)
        log.info("s3_stale_uploads_aborted", uri=self.uri, count=len(stale))

    def upload_file(self, local: Path, name: str, sha256: str) -> None:
        """Put `local` at <prefix>/<name> with `sha256` (hex, of the whole file) as its "sha256" metadata;
        a no-op when an object of that name, size and sha256 is there already.

        Raises:
            S3ObjectNotFound, S3AccessDenied, S3Unreachable: the bucket or endpoint cannot be used.
        """
        self._upload(Path(local), name, sha256, Path(local).stat().st_size)

    def publish(self, local_dir: Path, files: list[str], manifest_name: str = MANIFEST_FILE) -> None:
        """Upload every file of `files` and of the local manifest's entries not there yet, then the manifest,
        last, created only if absent.

        Raises:
            S3OutputConflict: the target holds another job's manifest, or objects that are not this output's.
            S3ObjectNotFound, S3AccessDenied, S3Unreachable: the bucket or endpoint cannot be used.
        """
        local_dir = Path(local_dir)
        body = (local_dir / manifest_name).read_bytes()
        manifest = json.loads(body)
        published = self._read_manifest(manifest_name)
        if published is not None:
            self._require_same_job(published, manifest)
            log.info("s3_already_published", uri=self.uri, job_fingerprint=manifest["job_fingerprint"])
            return
        # manifest entries first: their sha256 and size are known without reading the file again
        entries = {e["path"]: e for e in manifest["files"]}
        for name in files:
            if name not in entries and name != manifest_name:
                entries[name] = file_entry(local_dir, name)
        self._refuse_foreign_objects(set(entries) | {manifest_name})
        for name, entry in entries.items():
            self._upload(local_dir / name, name, entry["sha256"], entry["size"])
        self._create_manifest(manifest_name, body, manifest)

    def _read_manifest(self, manifest_name: str) -> dict | None:
        uri = self._uri(manifest_name)
        with s3_errors(uri, SPEC_FIELD):
            try:
                body = s3_client().get_object(Bucket=self._where.bucket, Key=self._key(manifest_name))["Body"].read()
            except ClientError as err:
                if s3_error_code(err) not in _MISSING:
                    raise
                return None
        return parse_published_manifest(body, self.uri, manifest_name, S3OutputConflict, _FIX_CONFLICT)

    def _upload(self, local: Path, name: str, sha256: str, size: int) -> None:
        uri = self._uri(name)
        if self._holds(name, size, sha256):
            log.info("s3_upload_skipped", uri=uri, name=name, bytes=size)
            return
        started = time.monotonic()
        config = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES,
                                max_request_concurrency=CONCURRENT_PARTS)
        extra = {"ChecksumAlgorithm": "SHA256", "Metadata": {"sha256": sha256}}
        with s3_errors(uri, SPEC_FIELD, access="write"), TransferManager(s3_client(), config) as transfers:
            transfers.upload(str(local), self._where.bucket, self._key(name), extra_args=extra).result()
        log.info("s3_upload_done", uri=uri, name=name, bytes=size, seconds=round(time.monotonic() - started, 3))

    def _holds(self, name: str, size: int, sha256: str) -> bool:
        """Whether <prefix>/<name> is there with this size and sha256 metadata."""
        with s3_errors(self._uri(name), SPEC_FIELD, access="write"):
            try:
                head = s3_client().head_object(Bucket=self._where.bucket, Key=self._key(name))
            except ClientError as err:
                if s3_error_code(err) not in _MISSING:
                    raise
                return False
        return head["ContentLength"] == size and head.get("Metadata", {}).get("sha256") == sha256

    def _refuse_foreign_objects(self, names: set[str]) -> None:
        # the claim and lock objects of storage/output_claims.py belong to the job that publishes
        foreign = sorted(set(list_s3_objects(self.uri, spec_field=SPEC_FIELD)) - names - set(CONTROL_FILES))
        if foreign:
            raise S3OutputConflict(
                f"output.uri {self.uri} holds {len(foreign)} objects that are not part of this output and no "
                f"{MANIFEST_FILE} (first: {foreign[0]}); {_FIX_CONFLICT}")

    def _create_manifest(self, manifest_name: str, body: bytes, manifest: dict) -> None:
        """Create the manifest only if none is there; a manifest that appeared meanwhile must be this job's."""
        uri = self._uri(manifest_name)
        for attempt in range(1, ATTEMPTS + 1):
            with s3_errors(uri, SPEC_FIELD, access="write"):
                try:
                    self._put_manifest(manifest_name, body, conditional=True)
                    log.info("s3_manifest_created", uri=uri, job_fingerprint=manifest["job_fingerprint"])
                    return
                except ClientError as err:
                    code = s3_error_code(err)
                    if code in _UNSUPPORTED:
                        self._check_then_put(manifest_name, body, manifest)
                        return
                    if code not in _EXISTS | _IN_PROGRESS:
                        raise
            published = self._read_manifest(manifest_name)
            if published is not None:
                self._require_same_job(published, manifest)
                log.info("s3_manifest_found", uri=uri, job_fingerprint=manifest["job_fingerprint"])
                return
            time.sleep(0.5 * attempt)  # 409: another writer's create had not finished; ask again
        raise S3OutputConflict(f"output.uri {self.uri}: another writer kept {manifest_name} locked for "
                               f"{ATTEMPTS} attempts; retry the job once the other job has finished")

    def _check_then_put(self, manifest_name: str, body: bytes, manifest: dict) -> None:
        # without conditional writes, two jobs racing between the check and the put both "win"
        uri = self._uri(manifest_name)
        log.warning("s3_conditional_write_unsupported", uri=uri, fallback="check_then_put")
        published = self._read_manifest(manifest_name)
        if published is not None:
            self._require_same_job(published, manifest)
            return
        with s3_errors(uri, SPEC_FIELD, access="write"):
            self._put_manifest(manifest_name, body, conditional=False)
        log.info("s3_manifest_created", uri=uri, job_fingerprint=manifest["job_fingerprint"])

    def _put_manifest(self, manifest_name: str, body: bytes, conditional: bool) -> None:
        s3_client().put_object(Bucket=self._where.bucket, Key=self._key(manifest_name), Body=body,
                               ContentType="application/json", ChecksumAlgorithm="SHA256",
                               **({"IfNoneMatch": "*"} if conditional else {}))

    def _require_same_job(self, published: dict, manifest: dict) -> None:
        theirs, ours = str(published.get("job_fingerprint")), str(manifest["job_fingerprint"])
        if theirs != ours:
            raise S3OutputConflict(
                f"output.uri {self.uri} holds the finished checkpoint of another job (fingerprint {theirs[:12]}, "
                f"this job {ours[:12]}); {_FIX_CONFLICT}")

    def _key(self, name: str) -> str:
        return f"{self._where.key}/{name}" if self._where.key else name

    def _uri(self, name: str) -> str:
        return f"s3://{self._where.bucket}/{self._key(name)}"

"""Who may write an output: the reconciler's claim and the running job's lock, made with conditional writes.

Both are one small JSON record {fingerprint, holder, time, nonce} kept beside the output, created only
if absent and replaced only if unchanged since it was read, so of two writers racing for it exactly one
wins, on every kind of output:

    local directory  <out>/.rayquant-claim.json, <out>/.rayquant-lock.json: exclusive create (a hard link of
                     a fully written file: fails if the name exists, and readers never see half a record)
    s3://b/prefix    <prefix>/.rayquant-claim.json, .rayquant-lock.json: PutObject with If-None-Match: *
                     to create, If-Match: <ETag> to replace or delete (412 PreconditionFailed for the loser)
    hf://org/name@b  the file `rayquant-claim.json` / `rayquant-lock.json` on a side branch
                     `rayquant-claim-<b>` / `rayquant-lock-<b>`: a commit whose parent_commit is the head that
                     was read (412 for the loser). A side branch, because the output branch must only move
                     with the job's one publishing commit (storage/hub_sink.py checks its parent).

A record older than `stale_after_s` belongs to a writer presumed dead and may be taken over (a replace
conditional on the stale record). The claim is written by `rayquant reconcile` before it submits a job
and stays with the output; the lock is held by the running job, renewed in the background and removed
at its end. Neither ever touches the output's own files. Times are the writers' clocks: machines that
share an output need clocks within a small fraction of `stale_after_s`.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Self

import structlog
from rayquant.storage.atomic_files import TMP_PREFIX, fsync_dir, write_atomic

log = structlog.get_logger()

CLAIM_FILE = ".rayquant-claim.json"
LOCK_FILE = ".rayquant-lock.json"
# beside the output's files: a sink or an output check must not take them for foreign files
CONTROL_FILES = (CLAIM_FILE, LOCK_FILE)
# a renewing job rewrites its lock this many times per stale_after_s, so one slow renewal is not a takeover
RENEWALS_PER_STALE = 3
# conditional writes lost to a writer that then vanished (released at once) before we give up
RACE_ATTEMPTS = 5
OUTPUT_FIELD = "output.uri"


class OutputLocked(Exception):
    """Another job holds the output's lock and renewed it within stale_after_s."""


class OutputNotWritable(Exception):
    """The output's directory cannot be created or written (read-only, no permission, a file on its path)."""


class OutputLockLost(Exception):
    """This job's lock was taken over (it went unrenewed for stale_after_s): another job may write the output."""


class MalformedClaim(Exception):
    """The output's claim or lock object exists but is not a record rayquant wrote."""


@dataclass(frozen=True)
class HeldBy:
    """One claim or lock record."""

    fingerprint: str  # the job fingerprint (JobSpec.fingerprint) the holder writes
    holder: str  # the reconciler's claimer id, or the job id holding the lock
    time: float  # unix seconds of the last write (a lock: its last renewal)
    nonce: str  # random per write: two writes never compare equal

    def age_s(self, now: float) -> float:
        return max(0.0, now - self.time)

    def is_stale(self, now: float, stale_after_s: float) -> bool:
        return self.age_s(now) > stale_after_s

    def to_bytes(self) -> bytes:
        body = {"fingerprint": self.fingerprint, "holder": self.holder, "time": self.time, "nonce": self.nonce}
        return (json.dumps(body, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class ClaimResult:
    won: bool  # this call created the claim, or took over a stale one
    claim: HeldBy  # the claim now there: ours if won, else the one that holds the output
    replaced: HeldBy | None  # the stale claim this call took over, if any


def new_record(fingerprint: str, holder: str) -> HeldBy:
    return HeldBy(fingerprint=fingerprint, holder=holder, time=time.time(), nonce=uuid.uuid4().hex)


def read_claim(uri: str) -> HeldBy | None:
    """The claim on output `uri`, or None.

    Raises:
        MalformedClaim: the claim object is not a rayquant record.
        the S3 / Hub errors of storage/s3_files.py and storage/hub_files.py (not found, denied, unreachable).
    """
    register = _open_register(uri, CLAIM_FILE)
    return _parse(register.read(), register.where)


def claim_output(uri: str, fingerprint: str, claimer: str, stale_after_s: float) -> ClaimResult:
    """Claim output `uri` for the job `fingerprint`: create the claim if there is none, take over one for the
    same fingerprint older than stale_after_s; otherwise report who holds it. Exactly one of several
    concurrent callers wins.

    Raises:
        MalformedClaim: the claim object is not a rayquant record.
        the S3 / Hub errors (not found, denied, unreachable).
    """
    register = _open_register(uri, CLAIM_FILE)
    for _ in range(RACE_ATTEMPTS):
        seen = register.read()
        current = _parse(seen, register.where)
        mine = new_record(fingerprint, claimer)
        if current is None:
            if register.create(mine.to_bytes()) is not None:
                return ClaimResult(won=True, claim=mine, replaced=None)
        elif current.fingerprint != fingerprint or not current.is_stale(time.time(), stale_after_s):
            return ClaimResult(won=False, claim=current, replaced=None)
        elif register.replace(mine.to_bytes(), seen) is not None:
            log.info("output_claim_taken_over", uri=uri, previous=current.holder,
                     age_s=round(current.age_s(mine.time), 1))
            return ClaimResult(won=True, claim=mine, replaced=current)
    raise _kept_changing(register.where)


def release_claim(uri: str, claim: HeldBy) -> bool:
    """Remove `claim` from output `uri` if it is still the claim there (a submission that failed); whether it was.

    Raises:
        MalformedClaim: the claim object is not a rayquant record.
        the S3 / Hub errors (not found, denied, unreachable).
    """
    register = _open_register(uri, CLAIM_FILE)
    seen = register.read()
    return _parse(seen, register.where) == claim and register.delete(seen)


def lock_holder(job_id: str) -> str:
    """A lock holder id naming this process: `job@host:pid`, so that a rerun on the same host can tell a
    holder that was killed (its pid gone) from one still running, and take over at once."""
    return f"{job_id}@{socket.gethostname()}:{os.getpid()}"


def holder_is_dead(holder: str) -> bool:
    """The holder is a process of this host (lock_holder's form) that no longer exists."""
    _, at, place = holder.rpartition("@")
    host, colon, pid = place.rpartition(":")
    if not (at and colon and pid.isdigit()) or host != socket.gethostname() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


SAME_JOB_WAIT_S = 60.0  # how long a run waits for a live holder of the same job before it gives up
SAME_JOB_POLL_S = 1.0


class OutputLock:
    """The running job's exclusive hold on its output, renewed every stale_after_s / 3 on a background thread.

    Use: `with OutputLock(spec.output.uri, job_id, fingerprint): ...`. A lock of another job renewed within
    stale_after_s refuses this one (OutputLocked); an older one is taken over (logged). A lock held by this
    same job id (an earlier run of it that died) is taken over at once.
    """

    def __init__(self, uri: str, job_id: str, fingerprint: str, stale_after_s: float = 600.0,
                 same_job_wait_s: float | None = None):
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s={stale_after_s}: must be > 0 seconds")
        self.uri, self.job_id, self.fingerprint, self.stale_after_s = uri, job_id, fingerprint, stale_after_s
        self.same_job_wait_s = SAME_JOB_WAIT_S if same_job_wait_s is None else same_job_wait_s
        self._register = _open_register(uri, LOCK_FILE)
        self._seen: _Seen | None = None  # what we last wrote: the condition of the next renewal or release
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._renewing = threading.Lock()  # renew() from the caller and the thread: both condition on _seen
        self._lost: HeldBy | None = None  # the record found in our place when a renewal failed

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    @property
    def held(self) -> HeldBy | None:
        """Our record as last written, None before acquire, after release or once lost."""
        return None if self._seen is None or self._lost is not None else _parse(self._seen, self._register.where)

    def acquire(self) -> None:
        """Create the lock (or take over a stale one) and start renewing it. A live holder of the same job (the
        same fingerprint: an attempt being stopped while this one starts, or the same command run twice) is
        waited for up to same_job_wait_s, polling; another job's is refused at once.

        Raises:
            OutputLocked: another job holds the lock and renewed it within stale_after_s, or the same job
                still held it after same_job_wait_s.
            MalformedClaim: the lock object is not a rayquant record.
            the S3 / Hub errors (not found, denied, unreachable).
        """
        give_up = time.monotonic() + self.same_job_wait_s
        waited_for: str | None = None
        attempts = 0
        while attempts < RACE_ATTEMPTS:
            attempts += 1
            seen = self._register.read()
            current = _parse(seen, self._register.where)
            mine = new_record(self.fingerprint, self.job_id)
            if current is None:
                version = self._register.create(mine.to_bytes())
            elif (current.holder == self.job_id or current.is_stale(mine.time, self.stale_after_s)
                  or holder_is_dead(current.holder)):
                version = self._register.replace(mine.to_bytes(), seen)
                if version is not None and current.holder != self.job_id:
                    log.warning("output_lock_taken_over", uri=self.uri, previous_job=current.holder,
                                age_s=round(current.age_s(mine.time), 1), stale_after_s=self.stale_after_s)
            elif current.fingerprint == self.fingerprint and time.monotonic() < give_up:
                if waited_for != current.holder:
                    log.info("output_lock_wait", uri=self.uri, holder=current.holder, wait_s=self.same_job_wait_s)
                    waited_for = current.holder
                time.sleep(SAME_JOB_POLL_S)
                attempts -= 1  # waiting is not a lost race
                continue
            else:
                raise self._locked_by(current, mine.time)
            if version is not None:
                self._seen = _Seen(mine.to_bytes(), version)
                self._start_renewing()
                log.debug("output_lock_acquired", uri=self.uri, stale_after_s=self.stale_after_s)
                return
        raise _kept_changing(self._register.where)

    def check(self) -> None:
        """Raise if the lock was lost; call before publishing.

        Raises:
            OutputLockLost: a renewal found another job's lock in our place.
        """
        if self._lost is not None:
            raise OutputLockLost(
                f"{OUTPUT_FIELD} {self.uri}: job {self.job_id} lost its lock to job {self._lost.holder} (it was "
                f"not renewed within {self.stale_after_s:g} s); stop one of the two jobs, then run this job again")

    def release(self) -> None:
        """Stop renewing and remove the lock if it is still ours (never another job's)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self._seen is not None and self._lost is None:
            removed = self._register.delete(self._seen)
            log.debug("output_lock_released", uri=self.uri, removed=removed)
        self._seen = None

    def renew(self) -> bool:
        """Rewrite our record with the time now, only if it is still ours; whether it was."""
        with self._renewing:
            if self._seen is None or self._lost is not None:
                return False
            mine = new_record(self.fingerprint, self.job_id)
            version = self._register.renew(mine.to_bytes(), self._seen)
            if version is None:
                self._lost = _parse(self._register.read(), self._register.where) or mine
                log.warning("output_lock_lost", uri=self.uri, now_held_by=self._lost.holder)
                return False
            self._seen = _Seen(mine.to_bytes(), version)
            return True

    def _start_renewing(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew_until_stopped, name="output-lock", daemon=True)
        self._thread.start()

    def _renew_until_stopped(self) -> None:
        interval = self.stale_after_s / RENEWALS_PER_STALE
        while not self._stop.wait(interval):
            try:
                if not self.renew():
                    return
            except Exception as err:  # noqa: BLE001 - a transient S3/Hub failure: the next renewal may pass;
                # a lock left unrenewed goes stale, and the renewal after a takeover then reports the loss
                log.warning("output_lock_renew_failed", uri=self.uri, error=type(err).__name__)

    def _locked_by(self, current: HeldBy, now: float) -> OutputLocked:
        return OutputLocked(
            f"{OUTPUT_FIELD} {self.uri} is being written by job {current.holder} (fingerprint "
            f"{current.fingerprint[:12]}, lock renewed {current.age_s(now):.0f} s ago, stale after "
            f"{self.stale_after_s:g} s); wait for that job to finish or stop it, or choose another {OUTPUT_FIELD}")


# --- the conditional register behind a claim or a lock, one per kind of output


@dataclass(frozen=True)
class _Seen:
    body: bytes | None  # the record's bytes as read; None when there is none
    version: str  # what a conditional write compares: local sha256 of body, S3 ETag, Hub branch head ("" absent)


class _Register(Protocol):
    where: str  # for messages: the object's URI or path

    def read(self) -> _Seen: ...

    def create(self, body: bytes) -> str | None: ...  # new version, or None if something is there

    def replace(self, body: bytes, seen: _Seen) -> str | None: ...  # None if it changed since `seen`

    def renew(self, body: bytes, seen: _Seen) -> str | None: ...  # replace our own fresh record

    def delete(self, seen: _Seen) -> bool: ...  # False if it changed since `seen`


def _open_register(uri: str, name: str) -> _Register:
    if uri.startswith("s3://"):
        return _S3Register(uri, name)
    if uri.startswith("hf://"):
        return _HubRegister(uri, name)
    return _LocalRegister(Path(uri) / name)


def _parse(seen: _Seen, where: str) -> HeldBy | None:
    if seen.body is None:
        return None
    try:
        body = json.loads(seen.body)
        return HeldBy(fingerprint=str(body["fingerprint"]), holder=str(body["holder"]), time=float(body["time"]),
                      nonce=str(body["nonce"]))
    except (ValueError, TypeError, KeyError) as err:
        raise MalformedClaim(f"{where} is not a claim or lock record rayquant wrote ({type(err).__name__}); "
                             "delete it if no rayquant job is writing this output") from err


def _kept_changing(where: str) -> RuntimeError:
    return RuntimeError(f"{where} changed under {RACE_ATTEMPTS} conditional writes in a row; retry")


class _LocalRegister:
    """A record file in a local (or shared-mount) directory; the directory is created on first write."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)

    def read(self) -> _Seen:
        try:
            body = self.path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):  # a file on the path: create() names it
            return _Seen(None, "")
        return _Seen(body, hashlib.sha256(body).hexdigest())

    def create(self, body: bytes) -> str | None:
        try:  # the first write of a job into its output: a directory it cannot write fails here, before any work
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=f"-{self.path.name}", dir=self.path.parent)
        except OSError as err:
            if err.errno == errno.ENOSPC:  # the CLI's DiskFull line
                raise
            raise OutputNotWritable(_not_writable(self.path.parent, err)) from err
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp_name, 0o644)
            try:
                os.link(tmp_name, self.path)  # the exclusive create: fails if the name exists (also over NFS)
            except FileExistsError:
                return None
        finally:
            os.unlink(tmp_name)
        fsync_dir(self.path.parent)
        return hashlib.sha256(body).hexdigest()

    def replace(self, body: bytes, seen: _Seen) -> str | None:
        # move the record aside under a unique name: of several movers only one gets it; if it is not the
        # record judged stale (rewritten meanwhile) it goes back. Then create, exclusively, as above.
        if seen.body is None:
            return self.create(body)
        if not self._take(seen):
            return None
        return self.create(body)

    def renew(self, body: bytes, seen: _Seen) -> str | None:
        # our own fresh record: rewritten in place by rename, so the name is never absent (a remove-then-
        # create would let a newcomer's create win while we still run); nobody else replaces a fresh record
        if self.read() != seen:
            return None
        write_atomic(self.path.parent, self.path, lambda path: path.write_bytes(body))
        return hashlib.sha256(body).hexdigest()

    def delete(self, seen: _Seen) -> bool:
        return seen.body is not None and self._take(seen)

    def _take(self, seen: _Seen) -> bool:
        """Remove the record if it is `seen`; put back anything else moved by mistake."""
        aside = self.path.with_name(f"{TMP_PREFIX}{uuid.uuid4().hex}-{self.path.name}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            if aside.read_bytes() == seen.body:
                return True
            try:
                os.link(aside, self.path)
            except FileExistsError:  # a newcomer created one meanwhile: its record stands
                pass
            return False
        finally:
            aside.unlink()


def _not_writable(directory: Path, err: OSError) -> str:
    existing = next((p for p in (directory, *directory.parents) if p.exists()), None)
    why = f"{existing} is a file" if existing is not None and not existing.is_dir() else err.strerror or str(err)
    return (f"output directory {directory} cannot be written ({why}); choose an output.uri (for s3:// and hf:// "
            "outputs: output.work_dir) in a directory you can write")


class _S3Register:
    """An object <prefix>/<name>, written with S3 conditional requests (If-None-Match / If-Match)."""

    _LOST = frozenset({"PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404", "NotFound"})

    def __init__(self, uri: str, name: str):
        from rayquant.storage.s3_files import (
            parse_s3_prefix,  # boto3 only for s3:// outputs
        )

        where = parse_s3_prefix(uri)
        self.bucket, self.key = where.bucket, f"{where.key}/{name}" if where.key else name
        self.where = f"s3://{self.bucket}/{self.key}"

    def read(self) -> _Seen:
        from botocore.exceptions import ClientError
        from rayquant.storage.s3_files import s3_client, s3_error_code, s3_errors

        with s3_errors(self.where, OUTPUT_FIELD):
            try:
                response = s3_client().get_object(Bucket=self.bucket, Key=self.key)
            except ClientError as err:
                if s3_error_code(err) not in ("NoSuchKey", "404"):
                    raise  # NoSuchBucket: s3_errors names the bucket to create
                return _Seen(None, "")
            return _Seen(response["Body"].read(), response["ETag"])

    def create(self, body: bytes) -> str | None:
        return self._put(body, IfNoneMatch="*")

    def replace(self, body: bytes, seen: _Seen) -> str | None:
        return self.create(body) if seen.body is None else self._put(body, IfMatch=seen.version)

    renew = replace

    def delete(self, seen: _Seen) -> bool:
        return seen.body is not None and self._conditional(
            lambda client: client.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=seen.version)) is not None

    def _put(self, body: bytes, **condition: str) -> str | None:
        response = self._conditional(lambda client: client.put_object(
            Bucket=self.bucket, Key=self.key, Body=body, ContentType="application/json", **condition))
        return None if response is None else response.get("ETag", "")

    def _conditional(self, request) -> dict | None:
        """request(client)'s response, or None when its condition failed (another writer was first)."""
        from botocore.exceptions import ClientError
        from rayquant.storage.s3_files import s3_client, s3_error_code, s3_errors

        with s3_errors(self.where, OUTPUT_FIELD, access="write"):
            try:
                return request(s3_client())
            except ClientError as err:
                if s3_error_code(err) not in self._LOST:
                    raise
                return None


class _HubRegister:
    """The file `name` (leading dot dropped) on the side branch rayquant-<claim|lock>-<branch> of the output's
    repo; every write is a commit whose parent must be the head that was read."""

    def __init__(self, uri: str, name: str):
        from rayquant.storage.hub_files import (  # huggingface_hub only for hf://
            DEFAULT_BRANCH,
            parse_hub_uri,
        )

        self.repo_id, branch = parse_hub_uri(uri)
        self.filename = name.lstrip(".")
        kind = self.filename.removeprefix("rayquant-").removesuffix(".json")
        self.branch = f"rayquant-{kind}-{branch or DEFAULT_BRANCH}"
        self.where = f"hf://{self.repo_id}@{self.branch}/{self.filename}"

    def read(self) -> _Seen:
        from rayquant.storage.hub_files import (
            HubFileNotFound,
            HubRepoNotFound,
            HubRevisionNotFound,
            read_hub_file,
            resolve_hub_revision,
        )

        try:
            head = resolve_hub_revision(self.repo_id, self.branch)
        except (HubRepoNotFound, HubRevisionNotFound):
            return _Seen(None, "")
        try:
            return _Seen(read_hub_file(self.repo_id, head, self.filename), head)
        except HubFileNotFound:
            return _Seen(None, head)

    def create(self, body: bytes) -> str | None:
        from huggingface_hub import CommitOperationAdd

        seen = self.read()
        if seen.body is not None:
            return None
        if not seen.version:  # no side branch yet (or no repo): make both, then write on the head made
            from rayquant.storage.hub_files import hub_api, hub_errors

            with hub_errors(self.repo_id, self.branch, spec_field=OUTPUT_FIELD, access="write to"):
                hub_api().create_repo(self.repo_id, private=True, exist_ok=True)
                hub_api().create_branch(self.repo_id, branch=self.branch, exist_ok=True)
            return self.create(body)
        return self._commit(CommitOperationAdd(self.filename, body), seen.version)

    def replace(self, body: bytes, seen: _Seen) -> str | None:
        from huggingface_hub import CommitOperationAdd

        if seen.body is None:
            return self.create(body)
        return self._commit(CommitOperationAdd(self.filename, body), seen.version)

    renew = replace

    def delete(self, seen: _Seen) -> bool:
        from huggingface_hub import CommitOperationDelete

        return seen.body is not None and self._commit(CommitOperationDelete(self.filename), seen.version) is not None

    def _commit(self, operation, parent: str) -> str | None:
        """The new head, or None when the branch moved past `parent` (another writer was first)."""
        from huggingface_hub.errors import HfHubHTTPError
        from rayquant.storage.hub_files import hub_api, hub_errors

        with hub_errors(self.repo_id, self.branch, spec_field=OUTPUT_FIELD, access="write to"):
            try:
                commit = hub_api().create_commit(self.repo_id, [operation], revision=self.branch,
                                                 parent_commit=parent, commit_message=f"rayquant: {self.filename}")
            except HfHubHTTPError as err:
                if err.response is None or err.response.status_code != 412:
                    raise
                return None
        return commit.oid

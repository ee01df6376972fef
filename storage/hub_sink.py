"""Publishing a checkpoint to hf://org/name[@branch]: shards uploaded as they close, one commit at the end.

`check_writable` (before any work) checks the token, creates the repo (private) and the branch if
missing, and remembers the branch's head commit. `upload_file` sends a closed shard's bytes to the Hub's
large-file storage right away (`preupload_lfs_files`): nothing appears in the repo yet, and bytes the
Hub already holds are not sent again. `publish` makes ONE commit holding every file and the manifest,
whose parent must be the remembered head: the manifest appears with all the files or not at all, and
of two jobs publishing to one branch the later one fails the parent check (HubOutputConflict) unless
the branch now holds the same job's checkpoint. A branch that already holds another job's manifest is
refused before committing, as a local output directory is.

Which files go to LFS and which in the commit itself is the Hub's answer to the client's preupload
request, kept as it is. With hf_xet installed huggingface_hub uploads through Xet instead of LFS
(HF_HUB_DISABLE_XET=1 turns that off); the Hub deduplicates those bytes the same way.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import structlog
from huggingface_hub import CommitOperationAdd, get_token
from huggingface_hub.errors import HfHubHTTPError

from rayquant.storage.hub_files import (
    DEFAULT_BRANCH,
    HubAccessDenied,
    HubFileNotFound,
    HubRepoNotFound,
    HubRevisionNotFound,
    hub_api,
    hub_errors,
    parse_hub_uri,
    read_hub_file,
    resolve_hub_revision,
)
from rayquant.storage.output_layout import MANIFEST_FILE
from rayquant.storage.sinks import parse_published_manifest

log = structlog.get_logger()

OUTPUT_FIELD = "output.uri"
_PARENT_MOVED = 412  # the Hub's answer to a commit whose parentCommit is no longer the branch head
_FIX_CONFLICT = "choose another output.uri (another repo, or another @branch)"


class HubOutputConflict(Exception):
    """The hf:// output branch holds another job's checkpoint, or moved while this job ran."""


class HubSink:
    """A checkpoint published to one branch of one Hub repo (`hf://org/name[@branch]`, default main)."""

    def __init__(self, uri: str):
        self.uri = uri
        self.repo_id, branch = parse_hub_uri(uri)
        self.branch = branch or DEFAULT_BRANCH
        self._head: str | None = None  # the branch's commit at check_writable: the parent of the final commit
        self._uploaded: dict[str, CommitOperationAdd] = {}  # pre-uploaded files, reused by publish
        self._lock = threading.Lock()  # shards may close on another thread than the one that publishes

    def published_manifest(self) -> dict | None:
        """The rayquant-manifest.json at the branch head, parsed; None if the repo, branch or file is absent.

        Raises:
            HubOutputConflict: the file there is not a manifest rayquant wrote.
            HubAccessDenied, HubUnreachable: the Hub cannot be used.
        """
        try:
            head = resolve_hub_revision(self.repo_id, self.branch)
        except (HubRepoNotFound, HubRevisionNotFound):
            return None
        return self._manifest_at(head, MANIFEST_FILE)

    def check_writable(self) -> None:
        """Preflight before any work: a token the Hub accepts, the repo (created private if missing) and the
        branch (created from main if missing); remembers the branch head as the final commit's parent.

        Raises:
            HubAccessDenied: no token, a rejected one, or one without write access.
            HubUnreachable: the Hub does not answer.
        """
        namespace = self.repo_id.split("/")[0]
        if get_token() is None:
            raise HubAccessDenied(f"{self.uri}: no Hugging Face token; set HF_TOKEN to a token with write access "
                                  f"to {namespace!r}")
        api = hub_api()
        with hub_errors(self.repo_id, self.branch, spec_field=OUTPUT_FIELD, access="write to"):
            role = api.whoami().get("auth", {}).get("accessToken", {}).get("role")
            if role == "read":
                raise HubAccessDenied(f"{self.uri}: the token in HF_TOKEN is a read-only token; set HF_TOKEN to "
                                      f"a token with write access to {namespace!r}")
            api.create_repo(self.repo_id, private=True, exist_ok=True)
            if self.branch != DEFAULT_BRANCH:  # a new repo has main already
                api.create_branch(self.repo_id, branch=self.branch, exist_ok=True)
        self._head = resolve_hub_revision(self.repo_id, self.branch)
        log.info("hub_output_ready", uri=self.uri, head=self._head)

    def upload_file(self, local: Path, name: str, sha256: str) -> None:
        """Send `local` (a closed shard; `sha256` hex of the whole file) to the repo's large-file storage now,
        to be committed as `name` by publish; bytes the Hub already holds are not sent again.

        Raises:
            HubAccessDenied, HubRepoNotFound, HubUnreachable: the Hub cannot be used.
        """
        self._require_checked()
        operation = CommitOperationAdd(path_in_repo=name, path_or_fileobj=Path(local))
        operation.upload_info.sha256 = bytes.fromhex(sha256)  # hashed when the shard closed: no second read
        with hub_errors(self.repo_id, self.branch, name, spec_field=OUTPUT_FIELD, access="write to"):
            hub_api().preupload_lfs_files(self.repo_id, [operation], revision=self.branch)
        with self._lock:
            self._uploaded[name] = operation
        log.info("hub_file_uploaded", uri=self.uri, name=name, bytes=operation.upload_info.size)

    def publish(self, local_dir: Path, files: list[str], manifest_name: str = MANIFEST_FILE) -> None:
        """One commit holding every file of `files` and, with them, the manifest; its parent is the head seen
        by check_writable. A no-op when the branch holds exactly these files already.

        Raises:
            HubOutputConflict: the branch holds another job's checkpoint, or moved since check_writable and
                does not hold this job's.
            HubAccessDenied, HubRepoNotFound, HubUnreachable: the Hub cannot be used.
        """
        self._require_checked()
        local_dir = Path(local_dir)
        fingerprint = json.loads((local_dir / manifest_name).read_bytes())["job_fingerprint"]
        self._refuse_other_job(self._manifest_at(self._head, manifest_name), fingerprint)
        with self._lock:
            uploaded = dict(self._uploaded)
        operations = [uploaded.get(name) or CommitOperationAdd(name, local_dir / name)
                      for name in files if name != manifest_name]
        operations.append(CommitOperationAdd(manifest_name, local_dir / manifest_name))
        try:
            with hub_errors(self.repo_id, self.branch, spec_field=OUTPUT_FIELD, access="write to"):
                commit = hub_api().create_commit(
                    self.repo_id, operations, revision=self.branch, parent_commit=self._head,
                    commit_message=f"rayquant: GPTQ checkpoint (job {fingerprint[:12]})")
        except HfHubHTTPError as err:
            if err.response is None or err.response.status_code != _PARENT_MOVED:
                raise
            self._accept_moved_branch(fingerprint, manifest_name, err)
            return
        log.info("hub_published", uri=self.uri, commit=commit.oid, files=len(operations))

    def _manifest_at(self, sha: str, manifest_name: str) -> dict | None:
        try:
            body = read_hub_file(self.repo_id, sha, manifest_name)
        except HubFileNotFound:
            return None
        return parse_published_manifest(body, self.uri, manifest_name, HubOutputConflict, _FIX_CONFLICT)

    def _refuse_other_job(self, published: dict | None, fingerprint: str) -> None:
        if published is not None and published["job_fingerprint"] != fingerprint:
            raise HubOutputConflict(
                f"{OUTPUT_FIELD} {self.uri} holds the finished checkpoint of another job (fingerprint "
                f"{str(published['job_fingerprint'])[:12]}, this job {fingerprint[:12]}); {_FIX_CONFLICT}")

    def _accept_moved_branch(self, fingerprint: str, manifest_name: str, err: HfHubHTTPError) -> None:
        """The branch moved since check_writable: fine if it now holds this very job's checkpoint."""
        head = resolve_hub_revision(self.repo_id, self.branch)
        published = self._manifest_at(head, manifest_name)
        self._refuse_other_job(published, fingerprint)
        if published is None:
            raise HubOutputConflict(
                f"{OUTPUT_FIELD} {self.uri}: the branch moved (from {self._head[:12]} to {head[:12]}) while this "
                f"job ran, without a rayquant checkpoint; {_FIX_CONFLICT}, or run the job again to publish on "
                "top of it") from err
        log.info("hub_already_published", uri=self.uri, commit=head, job_fingerprint=fingerprint)

    def _require_checked(self) -> None:
        if self._head is None:
            raise RuntimeError(f"{self.uri}: call check_writable() before upload_file() or publish()")

"""A local Hugging Face Hub for tests: the endpoints huggingface_hub 2.4's own client calls, on 127.0.0.1.

Repos, commits and LFS objects live in memory. Two origins (two ports), as on the real Hub: the API
and, for LFS objects, a storage origin standing in for the CDN and S3, reached through signed URLs.

API origin (every request needs `Authorization: Bearer <HubServer.token>`; anything else gets 401):
  GET  /api/whoami-v2                            the token's user, with a write role
  POST /api/validate-yaml                        a README.md's front matter: 400 unless it is a YAML mapping
  POST /api/repos/create                         a repo whose main holds one commit (.gitattributes); 409 if it exists
  GET  /api/models/{repo}[/revision/{rev}]       model_info: sha, private, siblings (?blobs=True: size, blobId, lfs)
  POST /api/models/{repo}/branch/{branch}        a branch at main's head (or at startingPoint); 409 if it exists
  POST /api/models/{repo}/preupload/{rev}        per file: uploadMode lfs (.safetensors/.bin, >= 10 MiB, a NUL in the
                                                 sample) or regular, and the oid the file has at rev
  POST /api/models/{repo}/commit/{branch}        NDJSON: header (parentCommit not the head: 412), file, lfsFile (never
                                                 uploaded: 400), deletedFile, deletedFolder
  POST /{repo}.git/info/lfs/objects/batch        LFS upload batch, transfer "basic" only (no xet): upload and verify
                                                 actions, none for an object stored already
  POST /{repo}.git/info/lfs/objects/verify       the verify action: 404 unless the object is stored with that size
  HEAD|GET /{repo}/resolve/{rev}/{path}          a regular file (Range: 206), or a 302 to the storage origin for an LFS
                                                 file; X-Repo-Commit, ETag, X-Linked-Size, X-Linked-Etag
Storage origin (signed URLs; a request that carries an Authorization header gets 400, as S3 answers a presigned
URL sent with a second credential):
  PUT /lfs/{oid}?sig=...                         store an LFS object (counted in lfs_puts); 400 unless sha256 is oid
  GET /lfs/{oid}?sig=...                         an LFS object (Range: 206)
Unknown repo, revision or file: 404 with X-Error-Code RepoNotFound, RevisionNotFound or EntryNotFound.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_rayquantTestToken0123456789abcdef"
USER = "rayquant-test"
LFS_SUFFIXES = (".safetensors", ".bin")
LFS_MIN_BYTES = 10 * 2**20
GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n*.bin filter=lfs diff=lfs merge=lfs -text\n"
_REPO = r"(?P<repo>[^/]+/[^/]+)"
API_ROUTES = [  # (methods, path pattern, HubServer method)
    ({"GET"}, r"/api/whoami-v2", "whoami"),
    ({"POST"}, r"/api/validate-yaml", "validate_yaml"),
    ({"POST"}, r"/api/repos/create", "create_repo"),
    ({"GET"}, rf"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?", "model_info"),
    ({"POST"}, rf"/api/models/{_REPO}/branch/(?P<rev>[^/]+)", "create_branch"),
    ({"POST"}, rf"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)", "preupload"),
    ({"POST"}, rf"/api/models/{_REPO}/commit/(?P<rev>[^/]+)", "commit"),
    ({"POST"}, rf"/{_REPO}\.git/info/lfs/objects/batch", "lfs_batch"),
    ({"POST"}, rf"/{_REPO}\.git/info/lfs/objects/verify", "lfs_verify"),
    ({"GET", "HEAD"}, rf"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)", "resolve"),
]


class HubError(Exception):
    """One HTTP error answer: status, message (X-Error-Message and JSON body), X-Error-Code."""

    def __init__(self, status: int, message: str, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass(frozen=True)
class Blob:
    size: int
    content: bytes | None = None  # a regular file's bytes
    oid: str | None = None  # an LFS file: the sha256 of its bytes, kept in HubServer.objects

    def etag(self) -> str:
        return self.oid or hashlib.sha1(b"blob %d\0" % self.size + self.content).hexdigest()


@dataclass
class Repo:
    private: bool
    refs: dict[str, str] = field(default_factory=dict)  # branch -> commit sha
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> path -> blob


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    cut: bool = False  # send half the body, then close the connection


def json_answer(content: object, status: int = 200) -> Answer:
    return Answer(status, json.dumps(content).encode(), {"Content-Type": "application/json"})


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """`bytes=a-b` or `bytes=a-` -> [start, end) within size; None without a Range header."""
    match = re.fullmatch(r"bytes=(\d+)-(\d*)", (header or "").strip())
    if match is None:
        return None
    start, last = int(match[1]), int(match[2]) if match[2] else size - 1
    if start > last or start >= size:
        raise HubError(416, f"range {header} outside {size} bytes")
    return start, min(last + 1, size)


def file_answer(data: bytes, range_header: str | None, headers: dict[str, str]) -> Answer:
    span = byte_range(range_header, len(data))
    if span is None:
        return Answer(200, data, headers)
    start, end = span
    return Answer(206, data[start:end], headers | {"Content-Range": f"bytes {start}-{end - 1}/{len(data)}"})


class HubServer:
    """The Hub's state and the endpoints' logic; the HTTP handler below only parses and answers."""

    def __init__(self) -> None:
        self.token = TOKEN
        self.repos: dict[str, Repo] = {}
        self.objects: dict[str, bytes] = {}  # LFS objects by sha256
        self.lfs_puts = 0  # LFS objects received (PUTs on the storage origin)
        self.storage_auth_headers = 0  # storage requests that carried an Authorization header (the token leaked)
        self.short_bodies = 0  # the next N ranged GETs answer half the bytes asked for (a complete, short 206)
        self.cut_bodies = 0  # the next N ranged GETs promise every byte asked for, send half and hang up
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request, both origins
        self.lock = threading.RLock()
        self._secret = secrets.token_bytes(16)
        self.endpoint = self.storage_endpoint = ""

    def env(self, hf_home: Path) -> dict[str, str]:
        """What points huggingface_hub (and rayquant) at this server, for a subprocess or monkeypatch.setenv."""
        return {"HF_ENDPOINT": self.endpoint, "HF_TOKEN": self.token, "HF_HOME": str(hf_home),
                "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1"}

    # --- repos and revisions

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def _commit_of(self, repo: Repo, rev: str) -> str:
        if rev in repo.refs:
            return repo.refs[rev]
        if rev in repo.commits:
            return rev
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    def _add_commit(self, repo: Repo, parent: str | None, files: dict[str, Blob]) -> str:
        listing = sorted((path, blob.etag()) for path, blob in files.items())
        sha = hashlib.sha1(json.dumps([parent, listing, len(repo.commits)]).encode()).hexdigest()
        repo.commits[sha] = files
        return sha

    def _storage_url(self, oid: str) -> str:
        return f"{self.storage_endpoint}/lfs/{oid}?sig={self._signature(oid)}"

    def _signature(self, oid: str) -> str:
        return hmac.new(self._secret, oid.encode(), hashlib.sha256).hexdigest()

    # --- API endpoints: (path groups, query, headers, body) -> Answer

    def whoami(self, **_) -> Answer:
        return json_answer({"type": "user", "name": USER, "auth": {"accessToken": {"role": "write"}}})

    def validate_yaml(self, body: bytes, **_) -> Answer:
        content = json.loads(body)["content"]
        front = content.split("\n---", 1)[0].removeprefix("---\n") if content.startswith("---\n") else ""
        try:
            metadata = yaml.safe_load(front) if front else {}
        except yaml.YAMLError as err:
            metadata = str(err)
        if not isinstance(metadata, dict):
            return json_answer({"errors": [{"message": f"front matter is not a YAML mapping: {metadata}"}]}, 400)
        return json_answer({"errors": [], "warnings": []})

    def create_repo(self, body: bytes, **_) -> Answer:
        payload = json.loads(body)
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_id in self.repos:
            return json_answer({"error": "You already created this model repo", "url": self._url(repo_id)}, 409)
        repo = Repo(private=payload.get("visibility") == "private" or payload.get("private") is True)
        repo.refs["main"] = self._add_commit(repo, None, {".gitattributes": Blob(len(GITATTRIBUTES), GITATTRIBUTES)})
        self.repos[repo_id] = repo
        return json_answer({"url": self._url(repo_id), "name": repo_id})

    def model_info(self, repo: str, rev: str | None, query: dict, **_) -> Answer:
        target = self._repo(repo)
        sha = self._commit_of(target, rev or "main")
        blobs = query.get("blobs", ["false"])[0].lower() == "true"
        siblings = [{"rfilename": path} | (_blob_metadata(blob) if blobs else {})
                    for path, blob in sorted(target.commits[sha].items())]
        return json_answer({"id": repo, "modelId": repo, "sha": sha, "private": target.private, "siblings": siblings})

    def create_branch(self, repo: str, rev: str, body: bytes, **_) -> Answer:
        target = self._repo(repo)
        if rev in target.refs:
            return json_answer({"error": "Reference already exists"}, 409)
        start = (json.loads(body or b"{}") or {}).get("startingPoint") or "main"
        target.refs[rev] = self._commit_of(target, start)
        return json_answer({})

    def preupload(self, repo: str, rev: str, body: bytes, **_) -> Answer:
        target = self._repo(repo)
        tree = target.commits[self._commit_of(target, rev)]
        answers = []
        for file in json.loads(body)["files"]:
            sample = base64.b64decode(file["sample"])
            lfs = file["path"].endswith(LFS_SUFFIXES) or file["size"] >= LFS_MIN_BYTES or b"\0" in sample
            present = tree.get(file["path"])
            answers.append({"path": file["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False,
                            "oid": present.etag() if present else None})
        return json_answer({"files": answers})

    def commit(self, repo: str, rev: str, body: bytes, **_) -> Answer:
        target = self._repo(repo)
        if rev not in target.refs:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = target.refs[rev]
        header, *lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        parent = header["value"].get("parentCommit")
        if parent is not None and parent != head:
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(target.commits[head])
        for line in lines:
            apply_operation(files, line["key"], line["value"], self.objects)
        target.refs[rev] = sha = self._add_commit(target, head, files)
        return json_answer({"commitUrl": f"{self._url(repo)}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})

    def lfs_batch(self, repo: str, body: bytes, **_) -> Answer:
        self._repo(repo)
        objects = []
        for obj in json.loads(body)["objects"]:
            entry = {"oid": obj["oid"], "size": obj["size"]}
            if obj["oid"] not in self.objects:  # no actions = already stored, nothing to send
                entry["actions"] = {"upload": {"href": self._storage_url(obj["oid"])},
                                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"}}
            objects.append(entry)
        return json_answer({"transfer": "basic", "objects": objects, "hash_algo": "sha256"})

    def lfs_verify(self, repo: str, body: bytes, **_) -> Answer:
        self._repo(repo)
        obj = json.loads(body)
        if obj["oid"] not in self.objects or len(self.objects[obj["oid"]]) != obj["size"]:
            raise HubError(404, f"LFS object {obj['oid']} not stored with size {obj['size']}")
        return json_answer({})

    def resolve(self, repo: str, rev: str, path: str, headers, **_) -> Answer:
        target = self._repo(repo)
        sha = self._commit_of(target, rev)
        blob = target.commits[sha].get(path)
        if blob is None:
            raise HubError(404, f"{path} does not exist at {rev}", "EntryNotFound")
        meta = {"X-Repo-Commit": sha, "ETag": f'"{blob.etag()}"'}
        if blob.oid is None:
            return self._maybe_short(file_answer(blob.content, headers.get("Range"), meta))
        return Answer(302, b"", meta | {"Location": self._storage_url(blob.oid), "X-Linked-Size": str(blob.size),
                                        "X-Linked-Etag": f'"{blob.oid}"'})

    # --- storage origin

    def storage(self, method: str, oid: str, query: dict, headers, body: bytes) -> Answer:
        if headers.get("Authorization"):
            self.storage_auth_headers += 1
            raise HubError(400, "Only one auth mechanism allowed: a signed URL takes no Authorization header")
        if not hmac.compare_digest(query.get("sig", [""])[0], self._signature(oid)):
            raise HubError(403, "bad or missing signature")
        if method == "PUT":
            if hashlib.sha256(body).hexdigest() != oid:
                raise HubError(400, f"body does not hash to {oid}")
            self.objects[oid] = body
            self.lfs_puts += 1
            return Answer(200, b"", {"ETag": f'"{oid}"'})
        if oid not in self.objects:
            raise HubError(404, f"no object {oid}")
        return self._maybe_short(file_answer(self.objects[oid], headers.get("Range"), {"ETag": f'"{oid}"'}))

    def _maybe_short(self, answer: Answer) -> Answer:
        if answer.status != 206:
            return answer
        if self.cut_bodies > 0:
            self.cut_bodies -= 1
            answer.cut = True
        elif self.short_bodies > 0:
            self.short_bodies -= 1
            answer.body = answer.body[: len(answer.body) // 2]
        return answer

    def _url(self, repo_id: str) -> str:
        return f"{self.endpoint}/{repo_id}"


def _blob_metadata(blob: Blob) -> dict:
    lfs = {"lfs": {"size": blob.size, "sha256": blob.oid, "pointerSize": 134}} if blob.oid else {}
    return {"size": blob.size, "blobId": blob.etag()} | lfs


def apply_operation(files: dict[str, Blob], key: str, value: dict, objects: dict[str, bytes]) -> None:
    """One NDJSON line of a commit applied to the tree being built."""
    path = value["path"]
    if key == "file":
        content = base64.b64decode(value["content"])
        files[path] = Blob(len(content), content=content)
    elif key == "lfsFile":
        if value["oid"] not in objects:
            raise HubError(400, f"{path}: LFS object {value['oid']} was never uploaded")
        files[path] = Blob(len(objects[value["oid"]]), oid=value["oid"])
    elif key == "deletedFile":
        files.pop(path, None)
    elif key == "deletedFolder":
        for name in [name for name in files if name.startswith(path.rstrip("/") + "/")]:
            del files[name]
    else:
        raise HubError(400, f"unknown commit operation {key!r}")


class HubHandler(BaseHTTPRequestHandler):
    """Parses one request, asks `hub` for the answer, sends it; `storage` picks the origin it serves."""

    hub: HubServer
    storage: bool
    protocol_version = "HTTP/1.1"  # keep-alive: the client's session reuses connections

    def do_GET(self) -> None:
        self._serve("GET")

    def do_HEAD(self) -> None:
        self._serve("HEAD")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def log_message(self, *args) -> None:  # quiet: pytest shows failures, not every request
        pass

    def _serve(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._read_body()
        with self.hub.lock:
            self.hub.requests.append((method, url.path))
            try:
                answer = self._answer(method, url.path, parse_qs(url.query), body)
            except HubError as err:
                answer = json_answer({"error": err.message}, err.status)
                answer.headers["X-Error-Message"] = err.message
                if err.code:
                    answer.headers["X-Error-Code"] = err.code
        self.send_response(answer.status)
        for key, value in answer.headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(answer.body)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(answer.body[: len(answer.body) // 2] if answer.cut else answer.body)
        self.close_connection = self.close_connection or answer.cut

    def _answer(self, method: str, path: str, query: dict, body: bytes) -> Answer:
        if self.storage:
            match = re.fullmatch(r"/lfs/([0-9a-f]{64})", path)
            if match is None or method not in ("GET", "PUT"):
                raise HubError(404, f"no route {method} {path}")
            return self.hub.storage(method, match[1], query, self.headers, body)
        if self.headers.get("Authorization") != f"Bearer {self.hub.token}":
            raise HubError(401, "Invalid credentials in Authorization header")
        for methods, pattern, name in API_ROUTES:
            match = re.fullmatch(pattern, path)
            if match and method in methods:
                groups = {key: unquote(value) if value else value for key, value in match.groupdict().items()}
                return getattr(self.hub, name)(**groups, query=query, headers=self.headers, body=body)
        raise HubError(404, f"no route {method} {path}")

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() != "chunked":
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))
        parts = []
        while size := int(self.rfile.readline().split(b";")[0], 16):
            parts.append(self.rfile.read(size))
            self.rfile.readline()
        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers, then the blank line
            pass
        return b"".join(parts)


@contextmanager
def run_hub_server() -> Iterator[HubServer]:
    """Serve a fresh HubServer's two origins on free loopback ports until the block exits."""
    hub = HubServer()
    servers = [ThreadingHTTPServer(("127.0.0.1", 0), type(name, (HubHandler,), {"hub": hub, "storage": storage}))
               for name, storage in (("ApiHandler", False), ("StorageHandler", True))]
    hub.endpoint, hub.storage_endpoint = (f"http://127.0.0.1:{server.server_address[1]}" for server in servers)
    threads = [threading.Thread(target=server.serve_forever, daemon=True) for server in servers]
    for server in servers:
        server.daemon_threads = True
    for thread in threads:
        thread.start()
    try:
        yield hub
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        for thread in threads:
            thread.join()

"""Opening a model that lives in S3 or on the Hugging Face Hub, without copying its weights.

Only the small files (config.json, the index, tokenizer and generation files) are downloaded, into a
per-revision folder of the local cache that the driver, the tokenizer and the workers read like a
local model directory. Each shard's header is fetched with two ranged reads (its length, then its
JSON); the tensors are then read one ranged request each by the workers, through the location strings
that TensorInfo.file holds (storage/remote_ranges.py). So an 810 GB source never touches a local disk.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rayquant.storage.atomic_files import write_atomic
from rayquant.storage.model_source import (AUX_FILES, CONFIG_FILE, ModelNotFound, ModelSource, index_tensors,
                                           parse_json_file, plan_shard_files)
from rayquant.storage.remote_ranges import hub_location
from rayquant.storage.safetensors_reader import INDEX_FILE, TensorInfo, header_length, parse_safetensors_header

HEADER_READERS = 8  # shard headers fetched in parallel: a 405B model has ~190 shards, each a round trip


@dataclass(frozen=True)
class RemoteFiles:
    """A model directory somewhere else: what it holds and how to read it."""

    uri: str  # as the spec names it, for messages
    revision: str  # immutable identity of what is read (Hub: commit sha; S3: hash of the objects' ETags)
    sizes: dict[str, int]  # file name (relative to the directory) -> bytes
    location: Callable[[str], str]  # file name -> location string for TensorInfo.file
    read_range: Callable[[str, int, int], bytes]  # (file name, start, end) -> bytes [start, end)
    download: Callable[[str, Path], None]  # (file name, local target) -> the whole (small) file written there


def s3_files(uri: str) -> RemoteFiles:
    """The objects under s3://bucket/prefix; the revision hashes every object's key, ETag and version."""
    from rayquant.storage.s3_files import list_s3_objects, read_s3_object, read_s3_range

    base = uri.rstrip("/")
    objects = list_s3_objects(base, spec_field="model.source")
    revision = hashlib.sha256()
    for name in sorted(objects):
        info = objects[name]
        revision.update(f"{name}\0{info.etag}\0{info.version_id or ''}\n".encode())

    def download(name: str, target: Path) -> None:
        data = read_s3_object(f"{base}/{name}", spec_field="model.source")
        write_atomic(target.parent, target, lambda path: path.write_bytes(data))

    def read_range(name: str, start: int, end: int) -> bytes:
        return read_s3_range(f"{base}/{name}", start, end, spec_field="model.source")

    return RemoteFiles(uri=uri, revision=revision.hexdigest(), sizes={n: o.size for n, o in objects.items()},
                       location=lambda name: f"{base}/{name}", read_range=read_range, download=download)


def hub_files(uri: str) -> RemoteFiles:
    """The files of hf://org/name[@revision] at the commit the revision resolves to now."""
    from rayquant.storage.hub_files import (download_hub_file, list_hub_files, parse_hub_uri, read_hub_range,
                                            resolve_hub_revision)

    repo_id, revision = parse_hub_uri(uri)
    sha = resolve_hub_revision(repo_id, revision)

    def download(name: str, target: Path) -> None:
        download_hub_file(repo_id, sha, name, target.parent)

    return RemoteFiles(uri=uri, revision=sha, sizes=list_hub_files(repo_id, sha),
                       location=lambda name: hub_location(repo_id, sha, name),
                       read_range=lambda name, start, end: read_hub_range(repo_id, sha, name, start, end),
                       download=download)


def open_remote_model(files: RemoteFiles, cache_dir: Path) -> ModelSource:
    """A ModelSource whose small files are in `cache_dir`/<uri>/<revision> and whose tensors stay remote.

    Raises:
        ModelNotFound: no config.json, no safetensors, or shards the index names are missing.
        InvalidModelFiles: config.json or the index is malformed or disagrees with the shards.
        CorruptSafetensors: a shard's header is unreadable or the shard is shorter than it says.
    """
    if CONFIG_FILE not in files.sizes:
        raise ModelNotFound(
            f"{files.uri} has no {CONFIG_FILE} (found {len(files.sizes)} files); point model.source at the "
            f"prefix or repository that holds the model's config.json and *.safetensors"
        )
    local = cache_dir / _folder_name(files.uri) / files.revision
    local.mkdir(parents=True, exist_ok=True)
    small = [CONFIG_FILE, *(name for name in (INDEX_FILE, *AUX_FILES) if name in files.sizes)]
    for name in small:
        if not (local / name).is_file():  # the folder is per revision: a file there is this revision's
            files.download(name, local / name)
    config = parse_json_file(local / CONFIG_FILE, (local / CONFIG_FILE).read_bytes())
    index = parse_json_file(local / INDEX_FILE, (local / INDEX_FILE).read_bytes()) if INDEX_FILE in small else None
    top_level = {name for name in files.sizes if "/" not in name}
    shards = plan_shard_files(files.uri, files.uri, top_level, index)
    with ThreadPoolExecutor(HEADER_READERS) as pool:
        headers = dict(zip(shards, pool.map(lambda name: _read_header(files, name), shards)))
    tensors = index_tensors(files.uri, {name: (headers[name], names) for name, names in shards.items()})
    return ModelSource(path=local.absolute(), config=config, tensors=tensors, revision=files.revision)


def _read_header(files: RemoteFiles, name: str) -> dict[str, TensorInfo]:
    size = files.sizes[name]
    length = header_length(files.read_range(name, 0, min(8, size)), size, files.location(name))
    return parse_safetensors_header(files.location(name), files.read_range(name, 8, 8 + length), size)


def _folder_name(uri: str) -> str:
    """A readable, collision-free folder name for a URI (its characters kept where safe, plus a hash)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", uri.split("://", 1)[-1]).strip("-")[:80]
    return f"{readable}-{hashlib.sha256(uri.encode()).hexdigest()[:8]}"

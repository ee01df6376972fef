"""Opening the model named by `model.source`: config, safetensors tensor index, revision.

Opening reads config.json and the safetensors headers (and, for a local directory's revision, 256 KiB of
sampled weight bytes per shard), never whole weights; tensors are then read
one at a time with `read_source_tensor`. Weights are read from safetensors files only: pickle
checkpoints (pytorch_model.bin) can run code when loaded and are refused.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayquant.storage.generated import GENERATED_PRESETS, cached_tensor_infos, generate_tensor, materialize_generated

from rayquant.storage.safetensors_reader import (
    INDEX_FILE,
    TensorInfo,
    read_safetensors_header,
    read_safetensors_header_json,
    read_tensor,
    sampled_data_bytes,
)
from rayquant.storage.synthetic import UnknownSyntheticPreset, materialize_synthetic

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt")

# files besides the weights that a quantized checkpoint carries over from its source, if present
AUX_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
)

SUPPORTED_SCHEMES = ("a local directory", "s3://bucket/prefix", "hf://org/name[@revision]", "synthetic://<preset>")


class ModelNotFound(Exception):
    """model.source names no directory, or one without config.json or safetensors weights."""


class InvalidModelFiles(Exception):
    """config.json or the safetensors index is malformed or disagrees with the shards."""


class UnsupportedModelSource(Exception):
    """model.source uses a URI scheme rayquant cannot read (only local, s3://, hf://, synthetic://)."""


class TensorNotFound(LookupError):
    """A tensor name that the model's safetensors files do not contain."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # absolute local directory holding config.json and the safetensors files
    config: dict  # parsed config.json
    tensors: dict[str, TensorInfo]  # every weight tensor, by its name in the source model
    revision: str  # local: sha256 of config.json + each shard's name, header JSON and sampled data windows
    generated: bool = False  # full-size synthetic shape: tensors are drawn on read (storage/generated.py)


def cache_root() -> Path:
    """$RAYQUANT_CACHE, else ~/.cache/rayquant: synthetic models, remote sources' small files, remote outputs."""
    root = os.environ.get("RAYQUANT_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "rayquant"


def default_cache_dir() -> Path:
    """Where synthetic:// models are built."""
    return cache_root() / "synthetic"


def open_model_source(uri: str, cache_dir: Path | None = None) -> ModelSource:
    """Open a local model directory, s3://bucket/prefix, hf://org/name[@revision] (weights stay remote,
    storage/remote_model.py) or a synthetic://<preset> (built into cache_dir on first use).

    Raises:
        UnsupportedModelSource: another URI scheme.
        the S3 / Hub errors of storage/s3_files.py and storage/hub_files.py (not found, denied, unreachable).
        ModelNotFound: the directory, its config.json, its safetensors weights or a shard is
            missing, or synthetic://<preset> names no preset.
        InvalidModelFiles: config.json or the index is malformed or disagrees with the shards.
        CorruptSafetensors: a shard's header is unreadable or the shard is truncated.
    """
    scheme, sep, rest = uri.partition("://")
    if not sep:
        return _open_local_dir(uri, Path(uri).expanduser())
    if scheme == "synthetic" and rest in GENERATED_PRESETS:
        path = materialize_generated(rest, cache_dir if cache_dir is not None else default_cache_dir())
        config_bytes = (path / CONFIG_FILE).read_bytes()
        config = json.loads(config_bytes)
        revision = hashlib.sha256(b"generated\0" + config_bytes).hexdigest()
        return ModelSource(path=path.resolve(), config=config, tensors=cached_tensor_infos(config, path.resolve()),
                           revision=revision, generated=True)
    if scheme == "synthetic":
        try:
            path = materialize_synthetic(rest, cache_dir if cache_dir is not None else default_cache_dir())
        except UnknownSyntheticPreset as err:
            raise ModelNotFound(str(err)) from err
        return _open_local_dir(uri, path)
    if scheme in ("s3", "hf"):
        from rayquant.storage.remote_model import hub_files, open_remote_model, s3_files  # boto3/hub: only here

        files = s3_files(uri) if scheme == "s3" else hub_files(uri)
        return open_remote_model(files, cache_root() / "sources")
    raise UnsupportedModelSource(
        f"model.source {uri!r}: the {scheme}:// scheme is not supported; "
        f"use {' or '.join(SUPPORTED_SCHEMES)} (download the model to a directory first)"
    )


def read_source_tensor(source: ModelSource, name: str, device: torch.device | str = "cpu") -> Tensor:
    """Read one tensor of the source model (its stored dtype) with one ranged read, onto `device`.

    Raises:
        TensorNotFound: name is not a tensor of this model.
        NonFiniteWeights: the tensor holds NaN or Inf.
    """
    if name not in source.tensors:
        raise TensorNotFound(
            f"tensor {name} is not in the safetensors files of {source.path} "
            f"(revision {source.revision[:12]}): its config.json and weights disagree; "
            f"pick another revision or fix the checkpoint (model.source)"
        )
    if source.generated:
        return generate_tensor(name, source.tensors[name], device)
    return read_tensor(source.tensors[name], name, device)


def check_config_matches_weights(source: ModelSource, expected: dict[str, tuple[int, ...]], blocks_path: str) -> None:
    """The shard headers agree with the model config.json describes (`expected`: state-dict name -> shape, from
    the meta skeleton), so no tensor fails to load in the middle of a job. Every tensor of config.json's blocks
    must be there, and no other; the others (embeddings, final norm) are checked where present. Blocks past
    config.json's are never read (DeepSeek-V3 keeps its multi-token-prediction layer there).

    Raises:
        InvalidModelFiles: a tensor has another shape, or one of config.json's blocks lacks or adds a tensor.
    """
    prefix = blocks_path + "."

    def block_of(name: str) -> str | None:
        return name[len(prefix):].split(".", 1)[0] if name.startswith(prefix) else None

    blocks = {block_of(name) for name in expected} - {None}
    found = {name: tuple(info.shape) for name, info in source.tensors.items()
             if name in expected or block_of(name) in blocks}
    problems = [f"{name} is {list(found[name])} in the weights, {list(shape)} by config.json"
                for name, shape in expected.items() if name in found and found[name] != shape]
    missing = [name for name in expected if block_of(name) is not None and name not in found]
    extra = [name for name in found if name not in expected]
    if missing:
        problems.append(f"{len(missing)} tensors config.json needs are not in the weights (first: {missing[0]})")
    if extra:
        problems.append(f"{len(extra)} tensors of the weights are not in config.json's model (first: {extra[0]})")
    if problems:
        raise InvalidModelFiles(
            f"config.json of {source.path} disagrees with its safetensors weights: {len(problems)} problem(s), "
            f"first: {problems[0]}; config and weights come from different models or revisions: re-download the "
            f"model, or fix config.json (model.source)"
        )


def list_aux_files(source: ModelSource) -> list[Path]:
    """The AUX_FILES present in the source directory, in AUX_FILES order."""
    return [source.path / name for name in AUX_FILES if (source.path / name).is_file()]


def _open_local_dir(uri: str, path: Path) -> ModelSource:
    path = path.absolute()  # workers (other processes, other cwd) receive str(source.path)
    if not path.is_dir():
        what = "is not a directory" if path.exists() else "does not exist"
        raise ModelNotFound(
            f"model directory {path} {what} (model.source = {uri!r}); set model.source to a "
            f"directory with config.json and *.safetensors, or to synthetic://llama-tiny"
        )
    config_path = path / CONFIG_FILE
    if not config_path.is_file():
        raise ModelNotFound(
            f"{path} has no {CONFIG_FILE} (model.source = {uri!r}); point model.source at the "
            f"directory that holds the model's config.json and *.safetensors"
        )
    shards = _find_shards(uri, path)  # first: it refuses links out of the directory before anything is read
    config_bytes = config_path.read_bytes()
    config = parse_json_file(config_path, config_bytes)
    tensors = _index_tensors(path, shards)

    revision = hashlib.sha256()
    revision.update(config_bytes)
    for shard in sorted(shards):
        revision.update(shard.name.encode())
        revision.update(read_safetensors_header_json(shard))
        revision.update(sampled_data_bytes(shard))
    return ModelSource(path=path, config=config, tensors=tensors, revision=revision.hexdigest())


def _find_shards(uri: str, path: Path) -> dict[Path, tuple[str, ...] | None]:
    """Shard file -> tensor names the index assigns to it (None: take the shard's own header).

    Raises:
        InvalidModelFiles: a file of the directory is a link to a file outside it.
    """
    present = {p.name for p in path.iterdir() if p.is_file()}
    # a link out of the model folder could make a job read, and publish as a tokenizer file, any file of this
    # machine; a Hugging Face cache snapshot links into its repo folder's blobs/, which stays allowed
    root = (path.parent.parent if path.parent.name == "snapshots" else path).resolve()
    for name in sorted(present):
        target = (path / name).resolve()
        if (path / name).is_symlink() and not target.is_relative_to(root):
            raise InvalidModelFiles(
                f"{path / name} is a link to {target}, outside the model directory {path} (model.source = "
                f"{uri!r}); copy the file into the directory, or point model.source at a directory you trust"
            )
    index_path = path / INDEX_FILE
    index = parse_json_file(index_path, index_path.read_bytes()) if index_path.is_file() else None
    shards = plan_shard_files(uri, str(path), present, index)
    return {path / name: names for name, names in shards.items()}


def plan_shard_files(uri: str, where: str, present: set[str], index: dict | None) -> dict[str, tuple[str, ...] | None]:
    """Which files of a model directory hold its weights: shard name -> the tensor names the index assigns
    to it (None: every tensor of the shard's header). `present` are the directory's file names.

    Raises:
        InvalidModelFiles: the index has no valid weight_map, or names a file outside the directory.
        ModelNotFound: shards the index names are missing, or there are no safetensors (pickle only).
    """
    if index is not None:
        weight_map = index.get("weight_map")
        if not (isinstance(weight_map, dict) and weight_map and all(isinstance(f, str) for f in weight_map.values())):
            raise InvalidModelFiles(
                f"{where}/{INDEX_FILE} has no valid weight_map (tensor name -> shard file name): "
                f"the index is damaged; re-download it"
            )
        files = sorted(set(weight_map.values()))
        escaping = [f for f in files if f.startswith("/") or "\\" in f or ".." in f.split("/")]
        if escaping:
            raise InvalidModelFiles(
                f"{where}/{INDEX_FILE} names shard files outside the model directory ({escaping[0]!r}): "
                f"the index is damaged or hostile; re-download the model from a source you trust"
            )
        missing = [f for f in files if f not in present]
        if missing:
            raise ModelNotFound(
                f"{INDEX_FILE} in {where} names shards that are missing: {', '.join(missing)} "
                f"(model.source = {uri!r}); the download is incomplete, re-download the model"
            )
        return {f: tuple(sorted(n for n, g in weight_map.items() if g == f)) for f in files}

    files = [SINGLE_FILE] if SINGLE_FILE in present else sorted(f for f in present if f.endswith(".safetensors"))
    if files:
        return {f: None for f in files}
    pickles = sorted(f for f in present if any(fnmatch.fnmatch(f, pattern) for pattern in PICKLE_PATTERNS))
    if pickles:
        raise ModelNotFound(
            f"{where} has only pickle weights ({', '.join(pickles)}), no *.safetensors "
            f"(model.source = {uri!r}); rayquant reads safetensors only, since loading pickle can "
            f"run arbitrary code: use the model's safetensors revision, or convert it once in a "
            f"trusted environment (from_pretrained(...).save_pretrained(..., safe_serialization=True))"
        )
    raise ModelNotFound(
        f"{where} has no *.safetensors weights (model.source = {uri!r}); point model.source at "
        f"the directory that holds the model's safetensors files"
    )


def _index_tensors(path: Path, shards: dict[Path, tuple[str, ...] | None]) -> dict[str, TensorInfo]:
    """Every tensor's TensorInfo from the local shard headers, checked against the index if any."""
    headers = {shard.name: (read_safetensors_header(shard), names) for shard, names in shards.items()}
    return index_tensors(str(path), headers)


def index_tensors(where: str, headers: dict[str, tuple[dict[str, TensorInfo], tuple[str, ...] | None]]
                  ) -> dict[str, TensorInfo]:
    """Every tensor's TensorInfo: shard name -> (its parsed header, the names the index gives it or None).

    Raises:
        InvalidModelFiles: the index places a tensor in a shard whose header lacks it, or a tensor is in two shards.
    """
    tensors: dict[str, TensorInfo] = {}
    owner: dict[str, str] = {}
    for shard, (header, names) in headers.items():
        if names is None:
            names = tuple(sorted(header))
        absent = [name for name in names if name not in header]
        if absent:
            raise InvalidModelFiles(
                f"{INDEX_FILE} in {where} places {len(absent)} tensors (first: {absent[0]}) in "
                f"{shard}, whose header lacks them: index and shards come from different "
                f"revisions; re-download the model"
            )
        for name in names:
            if name in tensors:
                raise InvalidModelFiles(
                    f"tensor {name} is in both {owner[name]} and {shard} in "
                    f"{where}: remove the stray safetensors file or add {INDEX_FILE}"
                )
            tensors[name], owner[name] = header[name], shard
    return tensors


def parse_json_file(path: Path, data: bytes) -> dict:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidModelFiles(f"{path} is not valid JSON ({err}); re-download it") from err
    if not isinstance(parsed, dict):
        raise InvalidModelFiles(f"{path} holds a JSON {type(parsed).__name__}, not an object; re-download it")
    return parsed

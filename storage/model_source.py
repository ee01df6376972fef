"""Opening the model named by `model.source`: config, safetensors tensor index, revision.

Opening reads config.json and the safetensors headers only, never weights; tensors are then read
one at a time with `read_source_tensor`. Weights are read from safetensors files only: pickle
checkpoints (pytorch_model.bin) can run code when loaded and are refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from rayquant.storage.generated import GENERATED_PRESETS, generate_tensor, generated_tensor_infos, materialize_generated

from rayquant.storage.safetensors_reader import (
    INDEX_FILE,
    TensorInfo,
    read_safetensors_header,
    read_safetensors_header_json,
    read_tensor,
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

SUPPORTED_SCHEMES = ("a local directory", "synthetic://<preset>")


class ModelNotFound(Exception):
    """model.source names no directory, or one without config.json or safetensors weights."""


class InvalidModelFiles(Exception):
    """config.json or the safetensors index is malformed or disagrees with the shards."""


class UnsupportedModelSource(Exception):
    """model.source uses a URI scheme this build cannot read (hf://, s3://, ...)."""


class TensorNotFound(LookupError):
    """A tensor name that the model's safetensors files do not contain."""


@dataclass(frozen=True)
class ModelSource:
    path: Path  # absolute local directory holding config.json and the safetensors files
    config: dict  # parsed config.json
    tensors: dict[str, TensorInfo]  # every weight tensor, by its name in the source model
    revision: str  # sha256 of config.json + each shard's header JSON (no weight bytes)
    generated: bool = False  # full-size synthetic shape: tensors are drawn on read (storage/generated.py)


def default_cache_dir() -> Path:
    """Where synthetic:// models are built: $RAYQUANT_CACHE/synthetic, else ~/.cache/rayquant/synthetic."""
    root = os.environ.get("RAYQUANT_CACHE")
    base = Path(root) if root else Path.home() / ".cache" / "rayquant"
    return base / "synthetic"


def open_model_source(uri: str, cache_dir: Path | None = None) -> ModelSource:
    """Open a local model directory or a synthetic://<preset> (built into cache_dir on first use).

    Raises:
        UnsupportedModelSource: a URI scheme other than synthetic:// (hf://, s3://, ...).
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
        return ModelSource(path=path.resolve(), config=config, tensors=generated_tensor_infos(config, path.resolve()),
                           revision=revision, generated=True)
    if scheme == "synthetic":
        try:
            path = materialize_synthetic(rest, cache_dir if cache_dir is not None else default_cache_dir())
        except UnknownSyntheticPreset as err:
            raise ModelNotFound(str(err)) from err
        return _open_local_dir(uri, path)
    raise UnsupportedModelSource(
        f"model.source {uri!r}: the {scheme}:// scheme is not supported yet in this build; "
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
    config_bytes = config_path.read_bytes()
    config = _parse_json(config_path, config_bytes)

    shards = _find_shards(uri, path)
    tensors = _index_tensors(path, shards)

    revision = hashlib.sha256()
    revision.update(config_bytes)
    for shard in sorted(shards):
        revision.update(shard.name.encode())
        revision.update(read_safetensors_header_json(shard))
    return ModelSource(path=path, config=config, tensors=tensors, revision=revision.hexdigest())


def _find_shards(uri: str, path: Path) -> dict[Path, tuple[str, ...] | None]:
    """Shard file -> tensor names the index assigns to it (None: take the shard's own header)."""
    index_path = path / INDEX_FILE
    if index_path.is_file():
        index = _parse_json(index_path, index_path.read_bytes())
        weight_map = index.get("weight_map")
        if not (
            isinstance(weight_map, dict)
            and weight_map
            and all(isinstance(file_name, str) for file_name in weight_map.values())
        ):
            raise InvalidModelFiles(
                f"{index_path} has no valid weight_map (tensor name -> shard file name): "
                f"the index is damaged; re-download it"
            )
        files = sorted(set(weight_map.values()))
        missing = [file_name for file_name in files if not (path / file_name).is_file()]
        if missing:
            raise ModelNotFound(
                f"{INDEX_FILE} in {path} names shards that are missing: {', '.join(missing)} "
                f"(model.source = {uri!r}); the download is incomplete, re-download the model"
            )
        return {
            path / file_name: tuple(sorted(n for n, f in weight_map.items() if f == file_name))
            for file_name in files
        }

    single = path / SINGLE_FILE
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if files:
        return {file: None for file in files}

    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in path.glob(pattern)})
    if pickles:
        raise ModelNotFound(
            f"{path} has only pickle weights ({', '.join(pickles)}), no *.safetensors "
            f"(model.source = {uri!r}); rayquant reads safetensors only, since loading pickle can "
            f"run arbitrary code: use the model's safetensors revision, or convert it once in a "
            f"trusted environment (from_pretrained(...).save_pretrained(..., safe_serialization=True))"
        )
    raise ModelNotFound(
        f"{path} has no *.safetensors weights (model.source = {uri!r}); point model.source at "
        f"the directory that holds the model's safetensors files"
    )


def _index_tensors(path: Path, shards: dict[Path, tuple[str, ...] | None]) -> dict[str, TensorInfo]:
    """Every tensor's TensorInfo from the shard headers, checked against the index if any."""
    tensors: dict[str, TensorInfo] = {}
    for shard, names in shards.items():
        header = read_safetensors_header(shard)
        if names is None:
            names = tuple(sorted(header))
        absent = [name for name in names if name not in header]
        if absent:
            raise InvalidModelFiles(
                f"{INDEX_FILE} in {path} places {len(absent)} tensors (first: {absent[0]}) in "
                f"{shard.name}, whose header lacks them: index and shards come from different "
                f"revisions; re-download the model"
            )
        for name in names:
            if name in tensors:
                raise InvalidModelFiles(
                    f"tensor {name} is in both {tensors[name].file.name} and {shard.name} in "
                    f"{path}: remove the stray safetensors file or add {INDEX_FILE}"
                )
            tensors[name] = header[name]
    return tensors


def _parse_json(path: Path, data: bytes) -> dict:
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidModelFiles(f"{path} is not valid JSON ({err}); re-download it") from err
    if not isinstance(parsed, dict):
        raise InvalidModelFiles(f"{path} holds a JSON {type(parsed).__name__}, not an object; re-download it")
    return parsed

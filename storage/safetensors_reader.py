"""Tensor-level ranged reads of safetensors files, with the header checked against the file.

A safetensors file is `u64 little-endian N` + `N bytes of JSON header` + a data buffer. The header
maps each tensor name to `{"dtype", "shape", "data_offsets": [begin, end]}`, offsets relative to
the start of the data buffer. We parse it ourselves so that a worker can read one tensor with one
seek + read of exactly its bytes, and so that a truncated or inconsistent file is reported with its
name and the fix before any tensor is used.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# Hugging Face's map from tensor name to shard file, beside sharded safetensors checkpoints
INDEX_FILE = "model.safetensors.index.json"

# safetensors refuses headers above 100 MB; a larger length means the first 8 bytes are not one
MAX_HEADER_BYTES = 100_000_000

DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "U16": torch.uint16,
    "I16": torch.int16,
    "U32": torch.uint32,
    "I32": torch.int32,
    "U64": torch.uint64,
    "I64": torch.int64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
}

_FIX = "re-download or re-copy the file"


class CorruptSafetensors(Exception):
    """The file's header is unreadable or disagrees with the file (truncation, bad offsets)."""


class NonFiniteWeights(Exception):
    """A floating-point tensor of the source model holds NaN or Inf."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path | str  # a local path, or a remote location (s3://..., hf://...) read by storage/remote_ranges.py
    dtype: str  # safetensors dtype string: "BF16", "F32", "I32", ...
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the first byte in `file`
    end: int  # absolute byte offset one past the last byte

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def header_length(prefix: bytes, file_size: int, where: object) -> int:
    """The JSON header's length from a file's first 8 bytes, checked against the file's size.

    Raises:
        CorruptSafetensors: the file is shorter than its header or the header length is implausible.
    """
    if len(prefix) < 8:
        raise CorruptSafetensors(
            f"{where}: file is {file_size} bytes, shorter than the 8-byte header length: "
            f"the file is truncated; {_FIX}"
        )
    header_len = int.from_bytes(prefix[:8], "little")
    if header_len > MAX_HEADER_BYTES:
        raise CorruptSafetensors(
            f"{where}: header length field says {header_len} bytes (limit {MAX_HEADER_BYTES}): "
            f"this is not a safetensors file or its start is damaged; {_FIX}"
        )
    if 8 + header_len > file_size:
        raise CorruptSafetensors(
            f"{where}: file is {file_size} bytes but its header ends at byte {8 + header_len}: "
            f"the file is truncated; {_FIX}"
        )
    return header_len


def read_safetensors_header_json(path: Path) -> bytes:
    """Return the raw JSON header bytes of a local safetensors file (hashed for the model revision).

    Raises:
        CorruptSafetensors: the file is shorter than its header or the header length is implausible.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as f:
        header_len = header_length(f.read(8), file_size, path)
        return f.read(header_len)


SAMPLED_WINDOWS = 16  # windows of the data region a local source's revision hashes, evenly spaced
SAMPLED_WINDOW_BYTES = 16 * 1024


def sampled_data_bytes(path: Path) -> bytes:
    """SAMPLED_WINDOWS windows of a local file's tensor data, at offsets that depend only on its size: new
    weights under an identical header (a fine-tune saved again) change them, a copy does not. 256 KiB per
    shard instead of hashing gigabytes.

    Raises:
        CorruptSafetensors: the file is shorter than its header or the header length is implausible.
    """
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        start = 8 + header_length(f.read(8), size, path)
        windows = []
        for i in range(SAMPLED_WINDOWS):
            f.seek(start + (size - start) * i // SAMPLED_WINDOWS)
            windows.append(f.read(SAMPLED_WINDOW_BYTES))
    return b"".join(windows)


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse and validate a local file's header; return each tensor's dtype, shape and absolute byte range.

    Raises:
        CorruptSafetensors: see parse_safetensors_header.
    """
    path = Path(path)
    return parse_safetensors_header(path, read_safetensors_header_json(path), path.stat().st_size)


def parse_safetensors_header(file: Path | str, header_json: bytes, file_size: int) -> dict[str, TensorInfo]:
    """Each tensor's TensorInfo from a header's JSON bytes; `file` is where the tensors are read from
    (a local path, or a remote location for storage/remote_ranges.py).

    Raises:
        CorruptSafetensors: unparseable header, unknown dtype, a byte range inconsistent with
            dtype x shape, overlapping tensors, or a tensor that ends past the end of the file.
    """
    data_start = 8 + len(header_json)
    try:
        header = json.loads(header_json.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CorruptSafetensors(
            f"{file}: the {len(header_json)}-byte header is not valid JSON ({err}): "
            f"the file is damaged or not a safetensors file; {_FIX}"
        ) from err
    if not isinstance(header, dict):
        raise CorruptSafetensors(
            f"{file}: the header is a JSON {type(header).__name__}, not an object; {_FIX}"
        )

    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(file, name, entry, data_start)

    _check_ranges(file, tensors, file_size)
    return tensors


def _tensor_info(path: Path | str, name: str, entry: object, data_start: int) -> TensorInfo:
    """One header entry -> TensorInfo, checking its fields and that its size fits dtype x shape."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise CorruptSafetensors(
            f"{path}: header entry for tensor {name} lacks dtype/shape/data_offsets: {entry!r}; {_FIX}"
        )
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPES:
        raise CorruptSafetensors(
            f"{path}: tensor {name} has dtype {dtype!r}, which this reader does not know "
            f"(known: {', '.join(DTYPES)}); convert the checkpoint to one of these dtypes or {_FIX}"
        )
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CorruptSafetensors(f"{path}: tensor {name} has invalid shape {shape!r}; {_FIX}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CorruptSafetensors(
            f"{path}: tensor {name} has invalid data_offsets {offsets!r}; {_FIX}"
        )
    expected = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != expected:
        raise CorruptSafetensors(
            f"{path}: tensor {name} ({dtype} {tuple(shape)}) needs {expected} bytes but its "
            f"data_offsets {offsets} span {offsets[1] - offsets[0]}: the header is inconsistent; {_FIX}"
        )
    return TensorInfo(
        file=path,
        dtype=dtype,
        shape=tuple(shape),
        start=data_start + offsets[0],
        end=data_start + offsets[1],
    )


def _check_ranges(path: Path | str, tensors: dict[str, TensorInfo], file_size: int) -> None:
    """Every tensor lies inside the file and no two tensors share bytes."""
    previous_name, previous_end = None, 0
    for name, info in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if info.end > file_size:
            raise CorruptSafetensors(
                f"{path}: file is {file_size} bytes but tensor {name} ends at {info.end}: "
                f"the file is truncated; {_FIX}"
            )
        if info.start < previous_end:
            raise CorruptSafetensors(
                f"{path}: tensor {name} starts at byte {info.start}, inside tensor "
                f"{previous_name} (ends at {previous_end}): the header is inconsistent; {_FIX}"
            )
        if info.nbytes > 0:
            previous_name, previous_end = name, info.end


def read_tensor(info: TensorInfo, name: str, device: torch.device | str = "cpu") -> Tensor:
    """Read one tensor with a single seek + read of exactly its byte range (source dtype), onto `device`.

    The NaN/Inf check runs on `device`, after the copy: on a GPU it costs nothing, where on the host it
    would compete with the block being computed while the next one is prefetched.

    Raises:
        CorruptSafetensors: the file got shorter since its header was read.
        NonFiniteWeights: a floating-point tensor holds NaN or Inf.
    """
    dtype = DTYPES[info.dtype]
    buffer = _read_range(info, name)
    if info.nbytes == 0:
        return torch.empty(info.shape, dtype=dtype, device=device)
    # the bytes are little-endian as on every host torch supports; view reinterprets them
    # (bf16 and float8 have no buffer-protocol type of their own)
    tensor = buffer.view(dtype).reshape(info.shape).to(device)
    if dtype.is_floating_point:
        _check_finite(tensor, info, name)
    return tensor


def _read_range(info: TensorInfo, name: str) -> Tensor:
    """The tensor's bytes as uint8: one seek + read locally, one ranged request remotely."""
    if isinstance(info.file, str):
        from rayquant.storage.remote_ranges import read_range  # boto3/huggingface_hub only for remote sources

        data = read_range(info.file, info.start, info.end)
        n_read = len(data)
        buffer = torch.frombuffer(bytearray(data), dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8)
    else:
        buffer = torch.empty(info.nbytes, dtype=torch.uint8)  # not zero-filled: the read is the one pass
        with info.file.open("rb") as f:
            f.seek(info.start)
            n_read = f.readinto(buffer.numpy())
    if n_read != info.nbytes:
        raise CorruptSafetensors(
            f"{info.file}: tensor {name} spans bytes [{info.start}, {info.end}) but only "
            f"{n_read} of its {info.nbytes} bytes could be read: the file is truncated; {_FIX}"
        )
    return buffer


def _check_finite(tensor: Tensor, info: TensorInfo, name: str) -> None:
    # isfinite has no float8 kernels; upcasting float8 is exact
    values = tensor.float() if tensor.element_size() == 1 else tensor
    bad = ~torch.isfinite(values)
    if bad.any():
        first = tuple(int(i) for i in bad.nonzero()[0])
        raise NonFiniteWeights(
            f"tensor {name} in {info.file} has {int(bad.sum())} NaN/Inf values (first at index "
            f"{first}): the source model is broken; fix the checkpoint or pick another revision "
            f"(model.source)"
        )

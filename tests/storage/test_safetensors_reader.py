import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayquant.storage.safetensors_reader import (
    CorruptSafetensors,
    NonFiniteWeights,
    read_safetensors_header,
    read_safetensors_header_json,
    read_tensor,
)


def _mixed_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 24, generator=g).to(torch.float16),
        "model.norm.weight": torch.randn(8, generator=g),
        "double": torch.randn(3, 5, generator=g, dtype=torch.float64),
        "ids32": torch.randint(-(2**31), 2**31 - 1, (7,), generator=g, dtype=torch.int32),
        "ids64": torch.randint(-(2**62), 2**62, (2, 3), generator=g, dtype=torch.int64),
        "bytes": torch.randint(0, 256, (5, 2), generator=g, dtype=torch.uint8),
        "signed_bytes": torch.randint(-128, 128, (9,), generator=g, dtype=torch.int8),
        "mask": torch.randint(0, 2, (4, 4), generator=g).bool(),
        "scalar": torch.tensor(3.25),
        "empty": torch.zeros(0, 4),
    }


def _write_raw(path: Path, header: dict, data: bytes) -> Path:
    """A safetensors file from a hand-written header, for cases save_file refuses to produce."""
    header_json = json.dumps(header).encode()
    path.write_bytes(len(header_json).to_bytes(8, "little") + header_json + data)
    return path


@pytest.fixture
def mixed_file(tmp_path: Path) -> Path:
    path = tmp_path / "mixed.safetensors"
    save_file(_mixed_tensors(), path, {"format": "pt"})
    return path


def test_read_tensor_returns_the_values_safetensors_load_file_returns(mixed_file: Path):
    expected = load_file(mixed_file)
    infos = read_safetensors_header(mixed_file)
    assert set(infos) == set(expected)
    for name, info in infos.items():
        tensor = read_tensor(info, name)
        assert tensor.dtype == expected[name].dtype, name
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name


def test_header_gives_absolute_byte_ranges_of_the_tensor_bytes(mixed_file: Path):
    data_start = 8 + len(read_safetensors_header_json(mixed_file))
    raw = json.loads(read_safetensors_header_json(mixed_file))
    file_bytes = mixed_file.read_bytes()
    for name, info in read_safetensors_header(mixed_file).items():
        begin, end = raw[name]["data_offsets"]
        assert (info.start, info.end) == (data_start + begin, data_start + end)
        assert info.file == mixed_file
        assert info.dtype == raw[name]["dtype"]
        assert info.shape == tuple(raw[name]["shape"])
    q = read_safetensors_header(mixed_file)["model.layers.0.self_attn.q_proj.weight"]
    stored = torch.frombuffer(bytearray(file_bytes[q.start : q.end]), dtype=torch.bfloat16)
    assert torch.equal(stored.reshape(16, 8), _mixed_tensors()["model.layers.0.self_attn.q_proj.weight"])


def test_read_tensor_reads_only_its_own_byte_range(tmp_path: Path):
    # NaNs written over the bytes of tensor "b" must not affect reading "a"
    path = tmp_path / "two.safetensors"
    save_file({"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(4)}, path)
    infos = read_safetensors_header(path)
    data = bytearray(path.read_bytes())
    data[infos["b"].start : infos["b"].end] = torch.full((4,), float("nan")).numpy().tobytes()
    path.write_bytes(bytes(data))
    assert torch.equal(read_tensor(infos["a"], "a"), torch.arange(6.0).reshape(2, 3))
    with pytest.raises(NonFiniteWeights):
        read_tensor(infos["b"], "b")


def test_file_truncated_in_the_middle_names_file_tensor_and_fix(mixed_file: Path):
    infos = read_safetensors_header(mixed_file)
    last_name, last = max(infos.items(), key=lambda item: (item[1].end, item[1].nbytes))
    size = mixed_file.stat().st_size
    mixed_file.write_bytes(mixed_file.read_bytes()[: last.start + 1])
    with pytest.raises(CorruptSafetensors) as err:
        read_safetensors_header(mixed_file)
    message = str(err.value)
    assert "truncated" in message
    assert str(mixed_file) in message
    assert last_name in message
    assert f"ends at {last.end}" in message and f"file is {last.start + 1} bytes" in message
    assert "re-download or re-copy" in message
    assert last.end == size


def test_file_truncated_inside_the_header_is_reported_as_truncated(mixed_file: Path):
    mixed_file.write_bytes(mixed_file.read_bytes()[:40])
    with pytest.raises(CorruptSafetensors, match="truncated"):
        read_safetensors_header(mixed_file)


def test_file_shorter_than_the_length_prefix_is_reported_as_truncated(tmp_path: Path):
    path = tmp_path / "stub.safetensors"
    path.write_bytes(b"\x10\x00\x00")
    with pytest.raises(CorruptSafetensors, match="3 bytes.*truncated"):
        read_safetensors_header(path)


def test_implausible_header_length_is_rejected(tmp_path: Path):
    path = tmp_path / "not_safetensors.bin"
    path.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors" * 4)
    with pytest.raises(CorruptSafetensors, match="not a safetensors file"):
        read_safetensors_header(path)


def test_header_that_is_not_json_is_rejected(tmp_path: Path):
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"{not json}" + b"\x00" * 16)
    with pytest.raises(CorruptSafetensors, match="not valid JSON"):
        read_safetensors_header(path)


def test_byte_range_inconsistent_with_dtype_and_shape_is_rejected(tmp_path: Path):
    header = {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 20]}}
    path = _write_raw(tmp_path / "short_range.safetensors", header, b"\x00" * 24)
    with pytest.raises(CorruptSafetensors, match=r"needs 24 bytes .* span 20"):
        read_safetensors_header(path)


def test_overlapping_tensors_are_rejected(tmp_path: Path):
    header = {
        "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
    }
    path = _write_raw(tmp_path / "overlap.safetensors", header, b"\x00" * 12)
    with pytest.raises(CorruptSafetensors, match="inside tensor a"):
        read_safetensors_header(path)


def test_unknown_dtype_is_rejected_with_the_known_list(tmp_path: Path):
    header = {"w": {"dtype": "Q4_K", "shape": [2], "data_offsets": [0, 2]}}
    path = _write_raw(tmp_path / "gguf_like.safetensors", header, b"\x00" * 2)
    with pytest.raises(CorruptSafetensors, match="'Q4_K'.*BF16"):
        read_safetensors_header(path)


def test_file_shrunk_after_its_header_was_read_fails_the_read(mixed_file: Path):
    infos = read_safetensors_header(mixed_file)
    last_name, last = max(infos.items(), key=lambda item: (item[1].end, item[1].nbytes))
    mixed_file.write_bytes(mixed_file.read_bytes()[: last.end - 2])
    with pytest.raises(CorruptSafetensors, match="truncated"):
        read_tensor(last, last_name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_weight_names_tensor_file_and_fix(tmp_path: Path, dtype: torch.dtype, bad: float):
    weight = torch.randn(4, 6, generator=torch.Generator().manual_seed(1)).to(dtype)
    weight[2, 5] = bad
    path = tmp_path / "broken.safetensors"
    name = "model.layers.1.mlp.down_proj.weight"
    save_file({name: weight}, path)
    with pytest.raises(NonFiniteWeights) as err:
        read_tensor(read_safetensors_header(path)[name], name)
    message = str(err.value)
    assert name in message and str(path) in message
    assert "(2, 5)" in message and "1 NaN/Inf" in message
    assert "source model is broken" in message and "another revision" in message


def test_integer_tensors_are_not_checked_for_finiteness(tmp_path: Path):
    path = tmp_path / "ints.safetensors"
    values = torch.tensor([-(2**31), 0, 2**31 - 1], dtype=torch.int32)
    save_file({"g_idx": values}, path)
    assert torch.equal(read_tensor(read_safetensors_header(path)["g_idx"], "g_idx"), values)


def test_tensor_byte_count_matches_dtype_times_shape(mixed_file: Path):
    for name, info in read_safetensors_header(mixed_file).items():
        expected = _mixed_tensors()[name]
        assert info.nbytes == math.prod(expected.shape) * expected.element_size(), name

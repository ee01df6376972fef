import hashlib
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from rayquant.storage.calibration import (
    BUILTIN_TEXT_PATH,
    CalibrationSet,
    CalibrationTooShort,
    TokenizerNotFound,
    UnsupportedDataset,
    load_calibration,
)

SEQ_LEN = 64
N_SAMPLES = 128  # enough that windows drawn from the whole stream would hit the tail (p = 0.9**128)


@pytest.fixture(scope="module")
def token_stream(llama_tiny_dir: Path) -> torch.Tensor:
    """The builtin text as llama-tiny's tokenizer sees it, computed independently of the loader."""
    tokenizer = AutoTokenizer.from_pretrained(llama_tiny_dir)
    text = BUILTIN_TEXT_PATH.read_text(encoding="utf-8")
    return torch.tensor(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


@pytest.fixture(scope="module")
def calib(llama_tiny_dir: Path) -> CalibrationSet:
    return load_calibration("builtin://text", llama_tiny_dir, N_SAMPLES, SEQ_LEN, 8, seed=0)


def _start_of(window: torch.Tensor, stream: torch.Tensor) -> int:
    """The first position where `window` occurs in `stream`."""
    prefixes = stream.unfold(0, 8, 1)  # [len - 7, 8] view: every 8-token prefix
    candidates = (prefixes == window[:8]).all(dim=1).nonzero().flatten().tolist()
    starts = [s for s in candidates if torch.equal(stream[s : s + len(window)], window)]
    assert starts, "window is not a slice of the token stream"
    return starts[0]


def test_builtin_text_is_a_few_hundred_kilobytes_of_prose():
    text = BUILTIN_TEXT_PATH.read_text(encoding="utf-8")
    assert 300_000 <= len(text.encode()) <= 600_000
    assert ":func:" not in text and ".. index::" not in text  # reST markup was stripped
    assert (BUILTIN_TEXT_PATH.parent / "NOTICE").read_text().count("Python Software Foundation") >= 2


def test_windows_have_the_requested_shape_and_hash(calib: CalibrationSet):
    assert calib.samples.shape == (N_SAMPLES, SEQ_LEN) and calib.samples.dtype == torch.int64
    assert calib.eval_samples.shape == (8, SEQ_LEN) and calib.eval_samples.dtype == torch.int64
    assert calib.window_sha256 == hashlib.sha256(calib.samples.numpy().tobytes()).hexdigest()


def test_same_seed_gives_the_same_windows_and_another_seed_other_windows(
    calib: CalibrationSet, llama_tiny_dir: Path
):
    again = load_calibration("builtin://text", llama_tiny_dir, N_SAMPLES, SEQ_LEN, 8, seed=0)
    assert torch.equal(again.samples, calib.samples) and again.window_sha256 == calib.window_sha256
    other = load_calibration("builtin://text", llama_tiny_dir, N_SAMPLES, SEQ_LEN, 8, seed=1)
    assert not torch.equal(other.samples, calib.samples)
    assert other.window_sha256 != calib.window_sha256
    assert torch.equal(other.eval_samples, calib.eval_samples)  # eval windows do not depend on the seed


def test_calibration_windows_come_from_before_the_held_out_tail(calib: CalibrationSet, token_stream: torch.Tensor):
    assert calib.n_calibration_tokens + calib.n_eval_tokens == len(token_stream)
    assert calib.n_eval_tokens == int(len(token_stream) * 0.1)
    starts = [_start_of(row, token_stream) for row in calib.samples]
    assert all(s + SEQ_LEN <= calib.n_calibration_tokens for s in starts)
    assert len(set(starts)) > 1


def test_eval_windows_are_evenly_spaced_inside_the_held_out_tail(calib: CalibrationSet, token_stream: torch.Tensor):
    tail_start = calib.n_calibration_tokens
    tail = token_stream[tail_start:]
    starts = [_start_of(row, tail) for row in calib.eval_samples]
    expected = torch.linspace(0, len(tail) - SEQ_LEN, 8).round().long().tolist()
    assert starts == expected
    assert starts[0] == 0 and starts[-1] + SEQ_LEN == len(tail)
    # first occurrence in the whole stream is in the tail: no eval window is calibration text
    assert all(_start_of(row, token_stream) >= tail_start for row in calib.eval_samples)


def test_seq_len_longer_than_the_held_out_tail_names_the_spec_field(calib: CalibrationSet, llama_tiny_dir: Path):
    seq_len = calib.n_eval_tokens
    with pytest.raises(CalibrationTooShort) as err:
        load_calibration("builtin://text", llama_tiny_dir, 4, seq_len, 2, seed=0)
    message = str(err.value)
    assert "calibration.seq_len" in message and "held-out eval" in message
    assert f"at most {calib.n_eval_tokens - 1}" in message
    # without eval windows the held-out tail is not needed
    no_eval = load_calibration("builtin://text", llama_tiny_dir, 4, seq_len, 0, seed=0)
    assert no_eval.samples.shape == (4, seq_len) and no_eval.eval_samples.shape == (0, seq_len)


def test_seq_len_longer_than_the_calibration_part_names_the_spec_field(calib: CalibrationSet, llama_tiny_dir: Path):
    with pytest.raises(CalibrationTooShort, match=r"calibration part .*calibration\.seq_len"):
        load_calibration("builtin://text", llama_tiny_dir, 4, calib.n_calibration_tokens, 0, seed=0)


@pytest.mark.parametrize("dataset", ["hf://wikitext/wikitext-2-raw-v1", "s3://bucket/c4.jsonl", "builtin://c4"])
def test_other_datasets_are_not_supported_yet(dataset: str, llama_tiny_dir: Path):
    with pytest.raises(UnsupportedDataset) as err:
        load_calibration(dataset, llama_tiny_dir, 4, SEQ_LEN, 2, seed=0)
    assert "not supported yet" in str(err.value) and "builtin://text" in str(err.value)


def test_model_without_tokenizer_files_is_a_typed_error(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TokenizerNotFound, match="model.source"):
        load_calibration("builtin://text", tmp_path, 4, SEQ_LEN, 2, seed=0)

import hashlib
import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from rayquant.storage.calibration import (
    BUILTIN_TEXT_PATH,
    CalibrationSet,
    CalibrationTooShort,
    EmptyDataset,
    RecordsShorterThanSeqLen,
    TokenizerMismatch,
    TokenizerNotFound,
    UnsupportedDataset,
    load_calibration,
    vocab_size_of,
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
    rows = [hashlib.sha256(row.numpy().astype("<i8").tobytes()).hexdigest() for row in calib.samples]
    assert list(calib.window_sha256s) == rows and len(set(rows)) > 1
    assert calib.description.kind == "builtin" and calib.description.records_used == 1


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


@pytest.mark.parametrize("dataset", ["builtin://c4", "ftp://host/c4.jsonl", "c4.csv"])
def test_unknown_datasets_list_the_supported_forms(dataset: str, llama_tiny_dir: Path):
    with pytest.raises(UnsupportedDataset) as err:
        load_calibration(dataset, llama_tiny_dir, 4, SEQ_LEN, 2, seed=0)
    assert "builtin://text" in str(err.value) and "hf://" in str(err.value)


def test_model_without_tokenizer_files_is_a_typed_error(tmp_path: Path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(TokenizerNotFound, match="model.source"):
        load_calibration("builtin://text", tmp_path, 4, SEQ_LEN, 2, seed=0)


# --- record sources: packing, min_length, held-out records -------------------------------------------

N_RECORDS = 300


@pytest.fixture(scope="module")
def paragraphs() -> list[str]:
    """Real prose records: the first paragraphs of the builtin text."""
    text = BUILTIN_TEXT_PATH.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()][:N_RECORDS]


@pytest.fixture(scope="module")
def jsonl(paragraphs: list[str], tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("records") / "records.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in paragraphs), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def record_ids(paragraphs: list[str], llama_tiny_dir: Path) -> list[torch.Tensor]:
    """Each paragraph's token ids, tokenized independently of the loader."""
    tokenizer = AutoTokenizer.from_pretrained(llama_tiny_dir)
    return [torch.tensor(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in paragraphs]


def _joined(records: list[torch.Tensor], eos: int) -> torch.Tensor:
    out = []
    for i, r in enumerate(records):
        out += ([torch.tensor([eos])] if i else []) + [r]
    return torch.cat(out)


def test_concat_joins_records_with_eos_and_holds_out_the_last_tenth_of_records(
    jsonl: Path, record_ids: list[torch.Tensor], llama_tiny_dir: Path
):
    eos = AutoTokenizer.from_pretrained(llama_tiny_dir).eos_token_id
    n_held = N_RECORDS // 10
    calibration_stream = _joined(record_ids[: N_RECORDS - n_held], eos)
    held_out_stream = _joined(record_ids[N_RECORDS - n_held :], eos)
    calib = load_calibration(str(jsonl), llama_tiny_dir, 16, SEQ_LEN, 4, seed=0, vocab_size=1024)
    assert calib.n_calibration_tokens == len(calibration_stream) and calib.n_eval_tokens == len(held_out_stream)
    starts = [_start_of(row, calibration_stream) for row in calib.samples]
    assert len(set(starts)) > 1
    assert any((row == eos).any() for row in calib.samples)  # windows cross record boundaries
    assert [_start_of(row, held_out_stream) for row in calib.eval_samples] == (
        torch.linspace(0, len(held_out_stream) - SEQ_LEN, 4).round().long().tolist())
    d = calib.description
    assert (d.kind, d.packing, d.records_used, d.records_dropped, d.records_held_out) == (
        "jsonl", "concat", N_RECORDS - n_held, 0, n_held)


def test_per_sample_windows_are_the_first_tokens_of_distinct_calibration_records(
    jsonl: Path, record_ids: list[torch.Tensor], llama_tiny_dir: Path
):
    calibration_records = record_ids[: N_RECORDS - N_RECORDS // 10]
    long_enough = [r for r in calibration_records if len(r) >= SEQ_LEN]
    calib = load_calibration(str(jsonl), llama_tiny_dir, 32, SEQ_LEN, 2, seed=0,
                             packing="per_sample", min_length=SEQ_LEN)
    heads = {tuple(r[:SEQ_LEN].tolist()): i for i, r in enumerate(long_enough)}
    chosen = [heads[tuple(row.tolist())] for row in calib.samples]  # KeyError = not a record's first tokens
    assert len(set(chosen)) == 32
    assert calib.description.records_used == len(long_enough)
    assert calib.description.records_dropped == len(calibration_records) - len(long_enough) > 0
    other = load_calibration(str(jsonl), llama_tiny_dir, 32, SEQ_LEN, 2, seed=1,
                             packing="per_sample", min_length=SEQ_LEN)
    assert set(other.window_sha256s) != set(calib.window_sha256s)


def test_per_sample_with_records_shorter_than_seq_len_says_to_set_min_length(jsonl: Path, llama_tiny_dir: Path):
    with pytest.raises(RecordsShorterThanSeqLen) as err:
        load_calibration(str(jsonl), llama_tiny_dir, 8, SEQ_LEN, 2, seed=0, packing="per_sample")
    assert f"calibration.min_length: {SEQ_LEN}" in str(err.value) and "packing: concat" in str(err.value)


def test_per_sample_needs_as_many_records_as_samples(jsonl: Path, llama_tiny_dir: Path):
    with pytest.raises(CalibrationTooShort, match="lower calibration.n_samples to at most"):
        load_calibration(str(jsonl), llama_tiny_dir, 1000, SEQ_LEN, 2, seed=0, packing="per_sample",
                         min_length=SEQ_LEN)
    with pytest.raises(CalibrationTooShort, match="single record"):
        load_calibration("builtin://text", llama_tiny_dir, 4, SEQ_LEN, 2, seed=0, packing="per_sample")


def test_min_length_that_drops_every_record_is_an_empty_dataset(jsonl: Path, llama_tiny_dir: Path):
    with pytest.raises(EmptyDataset, match="calibration.min_length=100000"):
        load_calibration(str(jsonl), llama_tiny_dir, 4, SEQ_LEN, 2, seed=0, min_length=100_000)


def test_tokenizer_larger_than_the_model_vocabulary_is_a_mismatch(llama_tiny_dir: Path):
    vocab = len(AutoTokenizer.from_pretrained(llama_tiny_dir))
    with pytest.raises(TokenizerMismatch) as err:
        load_calibration("builtin://text", llama_tiny_dir, 4, SEQ_LEN, 2, seed=0, vocab_size=vocab - 1)
    assert f"has {vocab} tokens" in str(err.value) and f"config.vocab_size is {vocab - 1}" in str(err.value)
    assert "model.source" in str(err.value)


def test_token_ids_past_the_model_vocabulary_are_a_mismatch(tmp_path: Path):
    # two tokens, but one of them has id 5000: the vocabulary size alone would not catch it
    tokens = Tokenizer(models.WordLevel({"[EOS]": 0, "hello": 5000}, unk_token="[EOS]"))
    tokens.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tokens, eos_token="[EOS]").save_pretrained(tmp_path)
    text = tmp_path / "hello.txt"
    text.write_text("hello " * 200, encoding="utf-8")
    with pytest.raises(TokenizerMismatch, match="produces token id 5000, past the model's config.vocab_size 1024"):
        load_calibration(str(text), tmp_path, 4, 16, 0, seed=0, vocab_size=1024)


def test_vocab_size_comes_from_the_text_config_of_multimodal_models():
    assert vocab_size_of({"vocab_size": 32000}) == 32000
    assert vocab_size_of({"text_config": {"vocab_size": 262144}}) == 262144
    assert vocab_size_of({"model_type": "x"}) is None

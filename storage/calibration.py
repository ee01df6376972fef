"""Calibration and held-out evaluation windows of token ids for a job.

The records of `calibration.dataset` (storage/text_sources.py) are tokenized with the model's own
tokenizer. A held-out tail never reaches the Hessians: the last `EVAL_FRACTION` of the tokens for
one running text (builtin://text, .txt), the last `EVAL_FRACTION` of the records otherwise. The
evaluation windows are evenly spaced over that tail (records joined with EOS).

Calibration windows are cut from the rest in one of two ways (`calibration.packing`):
- `concat`: records joined with the tokenizer's EOS into one stream, windows of seq_len at seeded
  random starts, as the GPTQ reference's `get_wikitext2`/`get_c4` do;
- `per_sample`: one window per record, its first seq_len tokens, records chosen by a seeded
  permutation.
Records with fewer than `calibration.min_length` tokens (and empty ones) are dropped first.
Every window is recorded by the sha256 of its int64 bytes, so the report names the exact tokens.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import structlog
import torch
from torch import Tensor
from transformers import AutoTokenizer

from rayquant.storage.job_records import DatasetDescription  # report.json's record, torch-free
from rayquant.storage.text_sources import (  # noqa: F401  (BUILTIN_*, UnsupportedDataset: this module's API too)
    BUILTIN_DATASETS,
    BUILTIN_TEXT_PATH,
    EmptyDataset,
    UnsupportedDataset,
    read_text_records,
)

log = structlog.get_logger()

# held-out tail of the tokens (or records); larger = more distinct eval windows, less calibration text
EVAL_FRACTION = 0.1
PACKINGS = ("concat", "per_sample")


class TokenizerNotFound(Exception):
    """The model directory has no tokenizer that transformers can load."""


class TokenizerMismatch(Exception):
    """The model directory's tokenizer does not belong to the model (ids past config.vocab_size)."""


class CalibrationTooShort(Exception):
    """The tokenized dataset cannot give the requested windows of calibration.seq_len tokens."""


class RecordsShorterThanSeqLen(Exception):
    """packing: per_sample with records shorter than calibration.seq_len and no min_length to drop them."""


@dataclass(frozen=True)
class CalibrationSet:
    samples: Tensor  # [n_samples, seq_len] int64, calibration windows
    eval_samples: Tensor  # [eval_samples, seq_len] int64, windows from the held-out tail
    window_sha256: str  # sha256 of `samples` as contiguous int64 bytes (C order)
    window_sha256s: tuple[str, ...]  # sha256 of each row of `samples` (int64 bytes), in row order
    n_calibration_tokens: int  # tokens the calibration windows were drawn from
    n_eval_tokens: int  # tokens in the held-out tail
    description: DatasetDescription


def vocab_size_of(model_config: dict) -> int | None:
    """config.json's vocab_size (a multimodal model's text_config's), None if it has none."""
    return model_config.get("vocab_size") or (model_config.get("text_config") or {}).get("vocab_size")


def load_calibration(
    dataset: str,
    tokenizer_dir: Path,
    n_samples: int,
    seq_len: int,
    eval_samples: int,
    seed: int,
    *,
    packing: str = "concat",
    min_length: int = 0,
    text_field: str = "text",
    split: str = "train",
    vocab_size: int | None = None,
    hf_cache_dir: Path | None = None,
) -> CalibrationSet:
    """Tokenize the dataset with the model's tokenizer and cut calibration and eval windows.

    vocab_size (the model's config.vocab_size) is checked against the tokenizer when given.

    Raises:
        the errors of text_sources.read_text_records (UnsupportedDataset, DatasetNotFound, ...).
        TokenizerNotFound: tokenizer_dir has no loadable tokenizer.
        TokenizerMismatch: the tokenizer's vocabulary or ids exceed vocab_size.
        EmptyDataset: no calibration record has max(min_length, 1) tokens.
        RecordsShorterThanSeqLen: per_sample packing with a record shorter than seq_len.
        CalibrationTooShort: too few tokens (concat) or records (per_sample) for the windows.
    """
    if packing not in PACKINGS:
        raise ValueError(f"packing={packing!r}; use one of {PACKINGS}")  # JobSpec validates it first
    records = read_text_records(dataset, text_field, split, hf_cache_dir)
    tokenizer = _load_tokenizer(Path(tokenizer_dir), vocab_size)
    ids = _tokenize(tokenizer, records.texts)
    if vocab_size is not None:
        _check_ids(ids, vocab_size, tokenizer_dir)

    if records.stream:  # one running text: hold out its last tokens
        tokens = ids[0]
        n_held = int(len(tokens) * EVAL_FRACTION)
        calibration, held_out = [tokens[: len(tokens) - n_held]], [tokens[len(tokens) - n_held :]]
    else:
        n_held = int(len(ids) * EVAL_FRACTION)
        calibration, held_out = ids[: len(ids) - n_held], ids[len(ids) - n_held :]
    shortest = max(min_length, 1)
    used = [r for r in calibration if len(r) >= shortest]
    held_out = [r for r in held_out if len(r) >= shortest]
    description = DatasetDescription(dataset, records.kind, packing, min_length, len(used),
                                     len(calibration) - len(used), len(held_out))
    log.info("calibration_records", dataset=dataset, kind=records.kind, packing=packing, used=len(used),
             dropped_shorter_than_min_length=description.records_dropped, held_out=len(held_out))
    if not used:
        raise EmptyDataset(
            f"calibration.dataset {dataset!r}: none of its {len(calibration)} calibration records has "
            f"calibration.min_length={min_length} tokens (or any tokens); lower calibration.min_length or use "
            "a dataset with longer records")

    eos = _eos_ids(tokenizer, tokenizer_dir, packing, max(len(used), len(held_out)))
    generator = torch.Generator().manual_seed(seed)
    if packing == "concat":
        stream = _join(used, eos)
        _check_length(dataset, "calibration", stream, seq_len, records.stream)
        starts = torch.randint(0, len(stream) - seq_len + 1, (n_samples,), generator=generator)
        samples = _windows(stream, starts, seq_len)
        n_calibration_tokens = len(stream)
    else:
        samples = _first_tokens(dataset, used, n_samples, seq_len, records.stream, min_length, generator)
        n_calibration_tokens = sum(len(r) for r in used)

    eval_tokens = _join(held_out, eos)
    if eval_samples > 0:
        _check_length(dataset, "held-out eval", eval_tokens, seq_len, records.stream)
    eval_starts = torch.linspace(0, len(eval_tokens) - seq_len, eval_samples).round().long()
    eval_windows = _windows(eval_tokens, eval_starts, seq_len)

    return CalibrationSet(
        samples=samples,
        eval_samples=eval_windows,
        window_sha256=windows_sha256(samples),
        window_sha256s=tuple(windows_sha256(row) for row in samples),
        n_calibration_tokens=n_calibration_tokens,
        n_eval_tokens=len(eval_tokens),
        description=description,
    )


def windows_sha256(windows: Tensor) -> str:
    """sha256 of token windows as contiguous int64 bytes (C order): how the report names exact tokens."""
    return hashlib.sha256(windows.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _load_tokenizer(tokenizer_dir: Path, vocab_size: int | None):
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise TokenizerNotFound(
            f"no tokenizer could be loaded from {tokenizer_dir} ({err}); the model named by "
            f"model.source needs tokenizer files (tokenizer.json + tokenizer_config.json)"
        ) from err
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise TokenizerMismatch(
            f"the tokenizer in {tokenizer_dir} has {len(tokenizer)} tokens but the model's config.vocab_size is "
            f"{vocab_size}: it belongs to another model; copy the model's own tokenizer files into model.source")
    return tokenizer


def _tokenize(tokenizer, texts: tuple[str, ...]) -> list[Tensor]:
    """Each text as token ids, no special tokens; [n_tokens] int64 each."""
    # verbose=False: texts are longer than model_max_length on purpose; windows cut them
    ids = tokenizer(list(texts), add_special_tokens=False, verbose=False)["input_ids"]
    return [torch.tensor(x, dtype=torch.int64) for x in ids]


def _check_ids(ids: list[Tensor], vocab_size: int, tokenizer_dir: Path) -> None:
    top = max((int(x.max()) for x in ids if len(x)), default=-1)
    if top >= vocab_size:
        raise TokenizerMismatch(
            f"the tokenizer in {tokenizer_dir} produces token id {top}, past the model's config.vocab_size "
            f"{vocab_size}: it belongs to another model; copy the model's own tokenizer files into model.source")


def _eos_ids(tokenizer, tokenizer_dir: Path, packing: str, n_records: int) -> Tensor:
    """The separator between joined records (none needed for n_records <= 1); [0] or [1] int64."""
    if n_records <= 1:
        return torch.empty(0, dtype=torch.int64)
    if tokenizer.eos_token_id is None:
        raise TokenizerMismatch(
            f"the tokenizer in {tokenizer_dir} defines no eos_token, which separates joined records "
            f"(packing: {packing}); add eos_token to its tokenizer_config.json or use a single-text dataset")
    return torch.tensor([tokenizer.eos_token_id], dtype=torch.int64)


def _join(records: list[Tensor], eos: Tensor) -> Tensor:
    """Records concatenated with EOS between them; [n_tokens] int64."""
    parts = []
    for i, r in enumerate(records):
        parts += [eos, r] if i else [r]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)


def _first_tokens(dataset: str, records: list[Tensor], n_samples: int, seq_len: int, stream: bool,
                  min_length: int, generator: torch.Generator) -> Tensor:
    """One window per record, its first seq_len tokens, records in seeded random order; [n_samples, seq_len]."""
    short = [len(r) for r in records if len(r) < seq_len]
    if short:
        raise RecordsShorterThanSeqLen(
            f"calibration.dataset {dataset!r}: {len(short)} of {len(records)} records have fewer than "
            f"calibration.seq_len={seq_len} tokens (shortest {min(short)}), and packing: per_sample needs one "
            f"whole window per record; set calibration.min_length: {seq_len} to drop them, lower "
            "calibration.seq_len, or use packing: concat")
    if len(records) < n_samples:
        what = "one running text (.txt/builtin) is a single record" if stream else f"min_length={min_length}"
        raise CalibrationTooShort(
            f"calibration.dataset {dataset!r} has {len(records)} calibration records ({what}), fewer than "
            f"calibration.n_samples={n_samples} with packing: per_sample; lower calibration.n_samples to at most "
            f"{len(records)}, add records, or use packing: concat")
    order = torch.randperm(len(records), generator=generator)[:n_samples]
    return torch.stack([records[i][:seq_len] for i in order.tolist()])


def _check_length(dataset: str, part: str, tokens: Tensor, seq_len: int, stream: bool) -> None:
    if len(tokens) < seq_len + 1:
        fix = (f"lower calibration.seq_len to at most {len(tokens) - 1}" if len(tokens) > 8 else
               "add text to the dataset")
        if part == "held-out eval" and not stream:
            fix += " or set calibration.eval_samples: 0 (the held-out part is the last 10 % of the records)"
        raise CalibrationTooShort(
            f"{dataset} gives {len(tokens)} tokens in its {part} part with this model's tokenizer, fewer than "
            f"calibration.seq_len + 1 = {seq_len + 1}; {fix}"
        )


def _windows(tokens: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    """Rows tokens[s : s + seq_len] for each start s; [len(starts), seq_len] int64."""
    return tokens[starts[:, None] + torch.arange(seq_len)]

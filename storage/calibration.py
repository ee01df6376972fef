"""Calibration and held-out evaluation windows of token ids for a job.

The dataset is tokenized as one stream with the model's own tokenizer. The last
`EVAL_FRACTION` of the stream is held out: calibration windows are drawn from the part before
it (seeded random starts, as in the GPTQ reference's `get_wikitext2`), evaluation windows from
the held-out tail (evenly spaced), so the perplexity the report measures is on text the Hessians
never saw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import AutoTokenizer

# Python 3.11 documentation prose, PSF License; see data/NOTICE
BUILTIN_TEXT_PATH = Path(__file__).parent / "data" / "builtin_text.txt"
BUILTIN_DATASETS: dict[str, Path] = {"builtin://text": BUILTIN_TEXT_PATH}

# held-out tail of the token stream; larger = more distinct eval windows, fewer calibration starts
EVAL_FRACTION = 0.1


class UnsupportedDataset(Exception):
    """calibration.dataset names a source this build cannot read."""


class TokenizerNotFound(Exception):
    """The model directory has no tokenizer that transformers can load."""


class CalibrationTooShort(Exception):
    """The tokenized dataset cannot hold one window of calibration.seq_len tokens."""


@dataclass(frozen=True)
class CalibrationSet:
    samples: Tensor  # [n_samples, seq_len] int64, calibration windows
    eval_samples: Tensor  # [eval_samples, seq_len] int64, windows from the held-out tail
    window_sha256: str  # sha256 of `samples` as contiguous int64 bytes (C order)
    n_calibration_tokens: int  # tokens the calibration windows were drawn from
    n_eval_tokens: int  # tokens in the held-out tail


def load_calibration(
    dataset: str,
    tokenizer_dir: Path,
    n_samples: int,
    seq_len: int,
    eval_samples: int,
    seed: int,
) -> CalibrationSet:
    """Tokenize the dataset with the model's tokenizer and cut calibration and eval windows.

    Raises:
        UnsupportedDataset: dataset is not one of BUILTIN_DATASETS.
        TokenizerNotFound: tokenizer_dir has no loadable tokenizer.
        CalibrationTooShort: either part of the token stream is shorter than seq_len + 1.
    """
    if dataset not in BUILTIN_DATASETS:
        raise UnsupportedDataset(
            f"calibration.dataset {dataset!r} is not supported yet in this build; "
            f"use one of: {', '.join(BUILTIN_DATASETS)}"
        )
    text = BUILTIN_DATASETS[dataset].read_text(encoding="utf-8")
    tokens = _tokenize(text, Path(tokenizer_dir))  # [n_tokens] int64

    n_eval_tokens = int(len(tokens) * EVAL_FRACTION)
    calibration_tokens = tokens[: len(tokens) - n_eval_tokens]
    eval_tokens = tokens[len(tokens) - n_eval_tokens :]
    _check_length(dataset, "calibration", calibration_tokens, seq_len, len(tokens))
    if eval_samples > 0:
        _check_length(dataset, "held-out eval", eval_tokens, seq_len, len(tokens))

    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(calibration_tokens) - seq_len + 1, (n_samples,), generator=generator)
    samples = _windows(calibration_tokens, starts, seq_len)

    eval_starts = torch.linspace(0, len(eval_tokens) - seq_len, eval_samples).round().long()
    eval_windows = _windows(eval_tokens, eval_starts, seq_len)

    return CalibrationSet(
        samples=samples,
        eval_samples=eval_windows,
        window_sha256=hashlib.sha256(samples.numpy().tobytes()).hexdigest(),
        n_calibration_tokens=len(calibration_tokens),
        n_eval_tokens=n_eval_tokens,
    )


def _tokenize(text: str, tokenizer_dir: Path) -> Tensor:
    """The whole text as one stream of token ids, no special tokens; [n_tokens] int64."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    except (OSError, ValueError) as err:
        raise TokenizerNotFound(
            f"no tokenizer could be loaded from {tokenizer_dir} ({err}); the model named by "
            f"model.source needs tokenizer files (tokenizer.json + tokenizer_config.json)"
        ) from err
    # verbose=False: the stream is longer than model_max_length on purpose; windows cut it
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.int64)


def _check_length(dataset: str, part: str, tokens: Tensor, seq_len: int, n_total: int) -> None:
    if len(tokens) < seq_len + 1:
        raise CalibrationTooShort(
            f"{dataset} gives {n_total} tokens with this model's tokenizer; its {part} part has "
            f"{len(tokens)} tokens, fewer than calibration.seq_len + 1 = {seq_len + 1}; "
            f"lower calibration.seq_len to at most {len(tokens) - 1}"
        )


def _windows(tokens: Tensor, starts: Tensor, seq_len: int) -> Tensor:
    """Rows tokens[s : s + seq_len] for each start s; [len(starts), seq_len] int64."""
    return tokens[starts[:, None] + torch.arange(seq_len)]

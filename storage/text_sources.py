"""The text records named by `calibration.dataset`, from each kind of source.

- `builtin://text`: the shipped Python documentation prose, one running text
- a local path or `s3://bucket/key` ending in `.txt` (one running text), `.jsonl` (one record per
  line, its `calibration.text_field`) or `.parquet` (the `text_field` column, read with pyarrow)
- `hf://<name>[/<config>]` (also `hf://<org>/<name>[/<config>]`): a dataset already in the local
  Hugging Face datasets cache, `calibration.split` of it. Read with the `Cache` builder that
  `datasets.load_dataset` itself uses when HF_DATASETS_OFFLINE=1, so nothing is downloaded: the
  offline switches of `datasets`/`huggingface_hub` are read when those modules are imported, so
  setting them here would come too late and would turn the whole process (hf:// models) offline.

A running text is held out by tokens downstream; records are held out by count (calibration.py).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path


# Python 3.11 documentation prose, PSF License; see data/NOTICE
BUILTIN_TEXT_PATH = Path(__file__).parent / "data" / "builtin_text.txt"
BUILTIN_DATASETS: dict[str, Path] = {"builtin://text": BUILTIN_TEXT_PATH}
FILE_SUFFIXES = (".txt", ".jsonl", ".parquet")
FORMS = "builtin://text, a .txt/.jsonl/.parquet path or s3://bucket/key, or hf://<dataset>[/<config>]"


class UnsupportedDataset(Exception):
    """calibration.dataset names a source this build cannot read."""


class DatasetNotFound(Exception):
    """calibration.dataset names a local file that does not exist."""


class DatasetNotCached(Exception):
    """An hf:// dataset (or its config or split) is not in the local Hugging Face datasets cache."""


class UnreadableDataset(Exception):
    """The dataset file is not valid UTF-8 text, JSON lines or Parquet, or lacks the text field."""


class EmptyDataset(Exception):
    """The dataset holds no text at all (or no record survives calibration.min_length)."""


@dataclass(frozen=True)
class TextRecords:
    texts: tuple[str, ...]  # in source order
    stream: bool  # one running text (builtin://text, .txt): held out by tokens, not by records
    kind: str  # builtin | txt | jsonl | parquet | hf


def read_text_records(dataset: str, text_field: str = "text", split: str = "train",
                      hf_cache_dir: Path | None = None) -> TextRecords:
    """Every text record of the dataset, in order; hf_cache_dir defaults to the datasets cache.

    Raises:
        UnsupportedDataset: an unknown scheme or file type.
        DatasetNotFound: a local file that does not exist.
        DatasetNotCached: an hf:// dataset, config or split missing from the local cache.
        UnreadableDataset: bad UTF-8, JSON or Parquet, or no `text_field` in a record.
        EmptyDataset: no record holds any text.
        S3ObjectNotFound, S3AccessDenied, S3Unreachable: an s3:// file could not be read.
    """
    if dataset in BUILTIN_DATASETS:
        records = TextRecords((BUILTIN_DATASETS[dataset].read_text(encoding="utf-8"),), True, "builtin")
    elif dataset.startswith("hf://"):
        records = _read_hf(dataset, text_field, split, hf_cache_dir)
    elif dataset.startswith("s3://"):
        suffix = _suffix(dataset)
        from rayquant.storage.s3_files import read_s3_object  # boto3 only for an s3:// dataset

        records = _parse(dataset, read_s3_object(dataset), suffix, text_field)
    elif "://" in dataset:
        raise UnsupportedDataset(f"calibration.dataset {dataset!r}: unknown scheme; use {FORMS}")
    else:
        suffix = _suffix(dataset)
        path = Path(dataset).expanduser()
        if not path.is_file():
            raise DatasetNotFound(f"calibration.dataset {dataset!r}: no such file ({path.resolve()}); "
                                  "check the path (relative paths start at the working directory)")
        try:
            data = path.read_bytes()
        except OSError as err:  # permissions, an unreadable device or file system
            raise UnreadableDataset(f"calibration.dataset {dataset!r} cannot be read ({err.strerror or err}); "
                                    "check its permissions or point calibration.dataset at a readable file") from err
        records = _parse(dataset, data, suffix, text_field)
    if not any(t.strip() for t in records.texts):
        raise EmptyDataset(f"calibration.dataset {dataset!r} holds no text ({len(records.texts)} records, all "
                           f"empty); point calibration.dataset at a file with text"
                           + (f" or check calibration.text_field ({text_field!r})" if not records.stream else ""))
    return records


def _suffix(dataset: str) -> str:
    suffix = Path(dataset).suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise UnsupportedDataset(f"calibration.dataset {dataset!r}: files must end in "
                                 f"{', '.join(FILE_SUFFIXES)}; use {FORMS}")
    return suffix


def _parse(dataset: str, data: bytes, suffix: str, text_field: str) -> TextRecords:
    if suffix == ".parquet":
        return TextRecords(_parquet_column(dataset, data, text_field), False, "parquet")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UnreadableDataset(f"calibration.dataset {dataset!r} is not UTF-8 text ({err}); "
                                "convert it to UTF-8") from err
    if suffix == ".txt":
        return TextRecords((text,), True, "txt")
    return TextRecords(_jsonl_field(dataset, text, text_field), False, "jsonl")


def _jsonl_field(dataset: str, text: str, text_field: str) -> tuple[str, ...]:
    texts = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UnreadableDataset(f"calibration.dataset {dataset!r} line {n} is not JSON ({err.msg}); "
                                    "write one JSON object per line") from err
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            fields = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UnreadableDataset(f"calibration.dataset {dataset!r} line {n} has no string field {text_field!r} "
                                    f"(has {fields}); set calibration.text_field to the field holding the text")
        texts.append(record[text_field])
    return tuple(texts)


def _parquet_column(dataset: str, data: bytes, text_field: str) -> tuple[str, ...]:
    import pyarrow as pa  # only Parquet needs it
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(io.BytesIO(data))
    except (pa.ArrowException, OSError) as err:
        raise UnreadableDataset(f"calibration.dataset {dataset!r} is not a readable Parquet file ({err}); "
                                "check that the file is complete (re-copy it) and really Parquet") from err
    names = parquet.schema_arrow.names
    if text_field not in names:
        raise UnreadableDataset(f"calibration.dataset {dataset!r} has no column {text_field!r} (columns: "
                                f"{', '.join(names)}); set calibration.text_field to the text column")
    try:
        column = parquet.read(columns=[text_field]).column(text_field)
    except (pa.ArrowException, OSError) as err:
        raise UnreadableDataset(f"calibration.dataset {dataset!r}: Parquet column {text_field!r} cannot be read "
                                f"({err}); check that the file is complete (re-copy it)") from err
    if not pa.types.is_string(column.type) and not pa.types.is_large_string(column.type):
        raise UnreadableDataset(f"calibration.dataset {dataset!r}: column {text_field!r} holds {column.type}, "
                                "not text; set calibration.text_field to the text column")
    return tuple(t for t in column.to_pylist() if t is not None)


def _read_hf(dataset: str, text_field: str, split: str, hf_cache_dir: Path | None) -> TextRecords:
    import datasets  # slow to import; only hf:// needs it
    from datasets.naming import camelcase_to_snakecase
    from datasets.packaged_modules.cache.cache import Cache

    cache_dir = Path(hf_cache_dir or datasets.config.HF_DATASETS_CACHE)
    parts = dataset.removeprefix("hf://").strip("/").split("/")
    if len(parts) == 2 and (cache_dir / f"{parts[0]}___{camelcase_to_snakecase(parts[1])}").is_dir():
        name, config = "/".join(parts), None  # org/name, cached as org___name
    elif len(parts) in (1, 2):
        name, config = parts[0], (parts[1] if len(parts) == 2 else None)
    elif len(parts) == 3:
        name, config = "/".join(parts[:2]), parts[2]
    else:
        raise UnsupportedDataset(f"calibration.dataset {dataset!r}: use hf://<dataset>[/<config>] or "
                                 "hf://<org>/<dataset>[/<config>]")
    how = (f"cache it on a machine with network access: python -c \"import datasets; datasets.load_dataset("
           f"{name!r}{f', {config!r}' if config else ''}, split={split!r})\" with HF_DATASETS_CACHE (or HF_HOME) "
           f"pointing at the cache this job reads ({cache_dir})")
    try:
        builder = Cache(cache_dir=str(cache_dir), dataset_name=name.split("/")[-1], repo_id=name,
                        config_name=config, version="auto", hash="auto")
    except (ValueError, FileNotFoundError) as err:
        raise DatasetNotCached(f"calibration.dataset {dataset!r} is not in the local Hugging Face datasets "
                               f"cache ({str(err).splitlines()[0]}); jobs never download datasets; {how}") from err
    try:
        table = builder.as_dataset(split=split)
    except (ValueError, KeyError) as err:
        raise DatasetNotCached(f"calibration.dataset {dataset!r}: split {split!r} is not cached ({err}); set "
                               f"calibration.split to a cached split or {how}") from err
    if text_field not in table.column_names:
        raise UnreadableDataset(f"calibration.dataset {dataset!r} has no column {text_field!r} (columns: "
                                f"{', '.join(table.column_names)}); set calibration.text_field to the text column")
    return TextRecords(tuple(t for t in table[text_field] if t is not None), False, "hf")


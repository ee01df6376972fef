"""Text records from every kind of calibration.dataset: builtin, .txt/.jsonl/.parquet files (local
and on a real S3 server), hf:// datasets in a local Hugging Face datasets cache; and the typed
errors for missing, uncached, unreadable and empty data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayquant.storage.text_sources import (
    BUILTIN_TEXT_PATH,
    DatasetNotCached,
    DatasetNotFound,
    EmptyDataset,
    UnreadableDataset,
    UnsupportedDataset,
    read_text_records,
)

RECORDS = ["First record: Ray schedules tasks.", "Second — with ünïcode.", "", "Fourth\nspans two lines."]
BUCKET = "rayquant-calibration"


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


def write_parquet(path: Path, texts: list[str], field: str = "text") -> Path:
    pq.write_table(pa.table({field: texts, "id": list(range(len(texts)))}), path)
    return path


class TinyCorpus(datasets.GeneratorBasedBuilder):
    """A dataset builder laid out in the cache exactly as a Hub dataset that load_dataset() prepared."""

    BUILDER_CONFIGS = [datasets.BuilderConfig(name="en")]

    def __init__(self, splits: dict[str, list[str]], **kwargs):
        self._splits = splits
        super().__init__(**kwargs)

    def _info(self) -> datasets.DatasetInfo:
        return datasets.DatasetInfo(features=datasets.Features({"text": datasets.Value("string")}))

    def _split_generators(self, dl_manager):
        return [datasets.SplitGenerator(name=s, gen_kwargs={"rows": rows}) for s, rows in self._splits.items()]

    def _generate_examples(self, rows):
        for i, text in enumerate(rows):
            yield i, {"text": text}


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory) -> Path:
    """A datasets cache holding rayquant-test/tiny_corpus (config en: train, validation) and tiny_plain."""
    cache = tmp_path_factory.mktemp("hf-datasets")
    TinyCorpus({"train": RECORDS, "validation": ["held out"]}, cache_dir=str(cache), dataset_name="tiny_corpus",
               repo_id="rayquant-test/tiny_corpus", config_name="en", hash="0123abcd").download_and_prepare()
    TinyCorpus({"train": RECORDS[:2]}, cache_dir=str(cache), dataset_name="tiny_plain", config_name="en",
               hash="4567cdef").download_and_prepare()
    return cache


def test_builtin_text_is_one_running_text():
    records = read_text_records("builtin://text")
    assert records.stream and records.kind == "builtin"
    assert records.texts == (BUILTIN_TEXT_PATH.read_text(encoding="utf-8"),)


def test_txt_file_is_one_running_text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("line one\n\nline two\n", encoding="utf-8")
    records = read_text_records(str(path))
    assert records.stream and records.texts == ("line one\n\nline two\n",) and records.kind == "txt"


def test_jsonl_records_come_in_file_order_from_the_text_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS, field="content")
    records = read_text_records(str(path), text_field="content")
    assert not records.stream and records.kind == "jsonl"
    assert records.texts == tuple(RECORDS)


def test_parquet_records_come_from_the_text_column(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", RECORDS)
    records = read_text_records(str(path))
    assert records.texts == tuple(RECORDS) and records.kind == "parquet"


def test_jsonl_without_the_text_field_names_the_spec_field(tmp_path):
    path = write_jsonl(tmp_path / "data.jsonl", RECORDS, field="body")
    with pytest.raises(UnreadableDataset) as err:
        read_text_records(str(path))
    assert "line 1 has no string field 'text'" in str(err.value) and "calibration.text_field" in str(err.value)
    assert "'body'" in str(err.value)


def test_jsonl_with_a_broken_line_names_the_line(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "cut\n', encoding="utf-8")
    with pytest.raises(UnreadableDataset, match="line 2 is not JSON"):
        read_text_records(str(path))


def test_text_that_is_not_utf8_says_to_convert_it(tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(UnreadableDataset, match="not UTF-8 text.*convert it to UTF-8"):
        read_text_records(str(path))


def test_truncated_parquet_is_unreadable(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", RECORDS * 50)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableDataset) as err:
        read_text_records(str(path))
    assert "not a readable Parquet file" in str(err.value) and "re-copy it" in str(err.value)


def test_parquet_without_the_column_lists_the_columns(tmp_path):
    path = write_parquet(tmp_path / "data.parquet", RECORDS, field="body")
    with pytest.raises(UnreadableDataset, match=r"no column 'text' \(columns: body, id\).*calibration.text_field"):
        read_text_records(str(path))


@pytest.mark.parametrize("name, content", [("empty.txt", ""), ("blank.txt", " \n\n "), ("empty.jsonl", ""),
                                           ("empty-texts.jsonl", '{"text": ""}\n{"text": "  "}\n')])
def test_a_file_with_no_text_is_an_empty_dataset(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(EmptyDataset, match="holds no text"):
        read_text_records(str(path))


def test_missing_local_file_is_not_found(tmp_path):
    with pytest.raises(DatasetNotFound, match="no such file"):
        read_text_records(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("dataset", ["builtin://c4", "ftp://host/data.jsonl", "data.csv", "s3://bucket/data.csv"])
def test_unknown_schemes_and_file_types_list_what_is_supported(dataset):
    with pytest.raises(UnsupportedDataset) as err:
        read_text_records(dataset)
    assert "builtin://text" in str(err.value) and ".jsonl" in str(err.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet", ".txt"])
def test_s3_files_read_like_local_ones(s3_env, tmp_path, suffix):
    s3_env.create_bucket(BUCKET)
    path = tmp_path / f"data{suffix}"
    if suffix == ".jsonl":
        write_jsonl(path, RECORDS)
    elif suffix == ".parquet":
        write_parquet(path, RECORDS)
    else:
        path.write_text("\n".join(RECORDS), encoding="utf-8")
    s3_env.client().upload_file(str(path), BUCKET, f"calib/data{suffix}")
    from_s3 = read_text_records(f"s3://{BUCKET}/calib/data{suffix}")
    assert from_s3 == read_text_records(str(path))


def test_hf_dataset_from_the_local_cache_matches_offline_load_dataset(hf_cache):
    records = read_text_records("hf://rayquant-test/tiny_corpus/en", hf_cache_dir=hf_cache)
    assert records.texts == tuple(RECORDS) and records.kind == "hf" and not records.stream
    # what datasets.load_dataset itself returns with the hub switched off, in a fresh process
    code = ("import datasets, json, sys; print(json.dumps(datasets.load_dataset('rayquant-test/tiny_corpus', 'en', "
            "split='validation', cache_dir=sys.argv[1])['text'][:]))")
    proc = subprocess.run([sys.executable, "-c", code, str(hf_cache)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    validation = read_text_records("hf://rayquant-test/tiny_corpus/en", split="validation", hf_cache_dir=hf_cache)
    assert list(validation.texts) == json.loads(proc.stdout.splitlines()[-1]) == ["held out"]


def test_hf_dataset_without_namespace_or_config(hf_cache):
    assert read_text_records("hf://tiny_plain", hf_cache_dir=hf_cache).texts == tuple(RECORDS[:2])
    assert read_text_records("hf://tiny_plain/en", hf_cache_dir=hf_cache).texts == tuple(RECORDS[:2])
    assert read_text_records("hf://rayquant-test/tiny_corpus", hf_cache_dir=hf_cache).texts == tuple(RECORDS)


def test_hf_dataset_not_in_the_cache_says_how_to_cache_it(hf_cache):
    with pytest.raises(DatasetNotCached) as err:
        read_text_records("hf://wikitext/wikitext-2-raw-v1", hf_cache_dir=hf_cache)
    message = str(err.value)
    assert "not in the local Hugging Face datasets cache" in message
    assert "datasets.load_dataset('wikitext', 'wikitext-2-raw-v1', split='train')" in message
    assert str(hf_cache) in message


def test_hf_config_or_split_not_cached_is_named(hf_cache):
    with pytest.raises(DatasetNotCached, match="config 'fr'"):
        read_text_records("hf://rayquant-test/tiny_corpus/fr", hf_cache_dir=hf_cache)
    with pytest.raises(DatasetNotCached, match="split 'test' is not cached.*calibration.split"):
        read_text_records("hf://rayquant-test/tiny_corpus/en", split="test", hf_cache_dir=hf_cache)


def test_hf_dataset_without_the_text_column(hf_cache):
    with pytest.raises(UnreadableDataset, match=r"no column 'content' \(columns: text\)"):
        read_text_records("hf://tiny_plain", text_field="content", hf_cache_dir=hf_cache)

"""Calibration data through the CLI: a JSONL file on the local S3 server quantizes with per-sample
packing and the report names every window; bad calibration input is a typed error, exit code 2,
nothing written."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from rayquant.jobs.input_errors import INPUT_ERRORS
from rayquant.storage import calibration, s3_files, text_sources
from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import open_model_source
from rayquant.storage.text_sources import BUILTIN_TEXT_PATH

from .models import SPEC, log_events, run_cli

BUCKET = "rayquant-e2e-calibration"
SEQ_LEN = 64


@pytest.fixture(scope="module")
def source_dir() -> Path:
    return open_model_source("synthetic://llama-tiny").path


def _paragraphs(n: int) -> list[str]:
    text = BUILTIN_TEXT_PATH.read_text(encoding="utf-8")
    return [p for p in text.split("\n\n") if p.strip()][:n]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def _quantize(out: Path, *overrides: str, env: dict[str, str] | None = None):
    args = [x for o in (f"output.uri={out}", f"calibration.seq_len={SEQ_LEN}", *overrides) for x in ("--set", o)]
    return run_cli("quantize", str(SPEC), *args, env={**os.environ, **(env or {})})


def _expect_bad_input(proc, error: str, fix: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert f"error: {error}:" in proc.stderr and fix in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.mark.slow
def test_s3_jsonl_per_sample_job_reports_each_window_hash(s3_server, source_dir, tmp_path):
    s3_server.create_bucket(BUCKET)
    local = _jsonl(tmp_path / "records.jsonl", _paragraphs(400))
    s3_server.client().upload_file(str(local), BUCKET, "calib/records.jsonl")
    uri = f"s3://{BUCKET}/calib/records.jsonl"
    out = tmp_path / "out"
    proc = _quantize(out, f"calibration.dataset={uri}", "calibration.packing=per_sample",
                     f"calibration.min_length={SEQ_LEN}", env=s3_server.env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = log_events(proc.stderr, "calibration_records")
    assert len(records) == 1 and records[0]["dropped_shorter_than_min_length"] >= 0

    report = json.loads((out / "report.json").read_text())
    # the same windows, cut here from the local copy of the file: identical tokens, identical hashes
    expected = load_calibration(str(local), source_dir, 32, SEQ_LEN, 8, seed=0, packing="per_sample",
                                min_length=SEQ_LEN)
    rows = [hashlib.sha256(row.numpy().astype("<i8").tobytes()).hexdigest() for row in expected.samples]
    assert report["calibration_window_sha256s"] == rows and len(set(rows)) == 32
    assert report["calibration_windows_sha256"] == expected.window_sha256
    dataset = report["calibration_dataset"]
    assert dataset["source"] == uri and dataset["kind"] == "jsonl" and dataset["packing"] == "per_sample"
    assert dataset["records_used"] + dataset["records_dropped"] + 40 == 400 and dataset["records_dropped"] > 0


def test_tokenizer_of_another_model_is_bad_input(source_dir, tmp_path):
    model = Path(shutil.copytree(source_dir, tmp_path / "model"))
    tokenizer = AutoTokenizer.from_pretrained(model)
    tokenizer.add_tokens([f"<extra_{i}>" for i in range(16)])  # 1040 tokens for a 1024-row embedding
    tokenizer.save_pretrained(model)
    out = tmp_path / "out"
    _expect_bad_input(_quantize(out, f"model.source={model}"), "TokenizerMismatch",
                      "config.vocab_size is 1024", out)


def test_s3_missing_key_is_bad_input(s3_server, tmp_path):
    s3_server.create_bucket(BUCKET)
    out = tmp_path / "out"
    uri = f"s3://{BUCKET}/missing/records.jsonl"
    _expect_bad_input(_quantize(out, f"calibration.dataset={uri}", env=s3_server.env()), "S3ObjectNotFound",
                      f"{uri}: key not found", out)


CALIBRATION_ERRORS = sorted(
    {v for m in (calibration, text_sources, s3_files) for v in vars(m).values()
     if isinstance(v, type) and issubclass(v, Exception) and v.__module__.startswith("rayquant.")},
    key=lambda e: e.__name__)


def test_calibration_modules_define_the_expected_errors():
    assert len(CALIBRATION_ERRORS) == 12, [e.__name__ for e in CALIBRATION_ERRORS]


@pytest.mark.parametrize("error", CALIBRATION_ERRORS, ids=lambda e: e.__name__)
def test_every_calibration_error_exits_with_code_2(error):
    assert issubclass(error, INPUT_ERRORS)  # the CLI maps INPUT_ERRORS to exit code 2 (jobs/cli.py)

"""Bad input through the CLI: a typed error naming the fix, exit code 2, no traceback, nothing written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from rayquant.storage.model_source import open_model_source

from .models import SPEC, output_files, run_cli


@pytest.fixture(scope="module")
def source_dir() -> Path:
    return open_model_source("synthetic://llama-tiny").path


def _shard_of(model_dir: Path, tensor: str) -> Path:
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
    return model_dir / index["weight_map"][tensor]


def _copy_model(source_dir: Path, dest: Path) -> Path:
    shutil.copytree(source_dir, dest)
    return dest


def _expect_bad_input(proc, error: str, fix: str, out: Path) -> None:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert error in proc.stderr and fix in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))


@pytest.mark.parametrize(
    "overrides, error, fix",
    [
        (["quant.bitz=4"], "SpecError", "unknown key"),
        (["quant.bits=5"], "SpecError", "use 2, 3, 4 or 8"),
        (["quant.group_size=0"], "SpecError", "use -1"),
        (["calibration.n_samples=1"], "SpecError", "raise calibration.n_samples or lower cluster.num_workers"),
        (["model.source=/nonexistent/model"], "ModelNotFound", "model.source"),
    ],
)
def test_invalid_spec_or_missing_model(tmp_path, overrides, error, fix):
    out = tmp_path / "out"
    args = [x for o in overrides for x in ("--set", o)]
    _expect_bad_input(run_cli("quantize", str(SPEC), "--set", f"output.uri={out}", *args), error, fix, out)


def test_unknown_key_in_spec_file(tmp_path):
    spec = tmp_path / "spec.yaml"
    spec.write_text("name: x\nquant:\n  bits: 4\n  colour: blue\n")
    out = tmp_path / "out"
    _expect_bad_input(run_cli("quantize", str(spec), "--set", f"output.uri={out}"), "quant.colour", "unknown key", out)


def test_truncated_safetensors(source_dir, tmp_path):
    model = _copy_model(source_dir, tmp_path / "model")
    shard = _shard_of(model, "model.layers.3.mlp.down_proj.weight")
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    out = tmp_path / "out"
    proc = run_cli("quantize", str(SPEC), "--set", f"model.source={model}", "--set", f"output.uri={out}")
    _expect_bad_input(proc, "CorruptSafetensors", "truncated", out)


@pytest.mark.slow
def test_nan_weight_fails_the_job_and_leaves_no_output(source_dir, tmp_path):
    model = _copy_model(source_dir, tmp_path / "model")
    name = "model.layers.1.mlp.down_proj.weight"
    shard = _shard_of(model, name)
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = run_cli("quantize", str(SPEC), "--set", f"model.source={model}", "--set", f"output.uri={out}")
    _expect_bad_input(proc, "NonFiniteWeights", name, out)


def test_encoder_only_model_is_unsupported(tmp_path):
    out = tmp_path / "out"
    proc = run_cli("quantize", str(SPEC), "--set", "model.source=synthetic://bert-tiny", "--set", f"output.uri={out}")
    _expect_bad_input(proc, "UnsupportedArchitecture", "choose a causal LM", out)


def test_output_holding_a_different_model_is_left_untouched(source_dir, tmp_path):
    out = _copy_model(source_dir, tmp_path / "out")  # a plain fp model where the output should go
    before = output_files(out)
    proc = run_cli("quantize", str(SPEC), "--set", f"output.uri={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "OutputConflict" in proc.stderr and "output.uri" in proc.stderr
    assert output_files(out) == before

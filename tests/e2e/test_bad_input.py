"""Bad input found during the job, through the CLI: a typed error naming the fix, exit code 2, no traceback,
nothing written. Bad input refused before any block is in the catalogue (test_bad_input_catalogue.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from rayquant.storage.model_source import open_model_source

from .models import SPEC, run_cli


@pytest.mark.slow
def test_nan_weight_fails_the_job_and_leaves_no_output(tmp_path):
    model = Path(shutil.copytree(open_model_source("synthetic://llama-tiny").path, tmp_path / "model"))
    name = "model.layers.1.mlp.down_proj.weight"
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = model / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name][3, 5] = float("nan")
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out"
    proc = run_cli("quantize", str(SPEC), "--set", f"model.source={model}", "--set", f"output.uri={out}")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert "NonFiniteWeights" in proc.stderr and name in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir()), sorted(out.rglob("*"))

"""The real path on a GPU: `rayquant quantize` with Ray and `gpus_per_worker: 1` writes, bit for bit,
the tensors the same job's worker computes in this process on that GPU (skipped without CUDA)."""

from __future__ import annotations

import json
import socket

import pytest
import torch
from safetensors import safe_open

from rayquant.jobs.driver import worker_setups, calibrate, open_job
from rayquant.jobs.spec import load_spec
from rayquant.workers.block_worker import BlockTask, BlockWorker

from .models import SPEC, log_events, run_cli

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.parametrize("preset", ["llama-tiny", "mixtral-tiny"])
def test_cli_on_a_gpu_writes_what_the_in_process_worker_computes(tmp_path, preset):
    out = tmp_path / "cli"
    sets = [f"model.source=synthetic://{preset}", f"output.uri={out}", "cluster.num_workers=1",
            "cluster.gpus_per_worker=1", "cluster.cpus_per_worker=2"]
    proc = run_cli("quantize", str(SPEC), *[arg for s in sets for arg in ("--set", s)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (ready,) = log_events(proc.stderr, "workers_ready")
    assert ready["gpus_per_worker"] == 1

    spec = load_spec(SPEC, sets)
    job = open_job(spec)
    calib = calibrate(spec, job.source)
    worker = BlockWorker(worker_setups(spec, "in-process", spec.model.source)[0])
    assert worker.device.type == "cuda"
    n_blocks = worker.start(_free_address(), calib.samples, calib.eval_samples)
    weight_map = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    compared = 0
    try:
        for b in range(n_blocks):
            tensors = worker.run_block(BlockTask("in-process", b)).tensors
            for name, expected in tensors.items():
                with safe_open(out / weight_map[name], framework="pt") as f:
                    written = f.get_tensor(name)
                assert written.dtype == expected.dtype and torch.equal(written, expected), name
                compared += 1
    finally:
        worker.stop()
    assert compared == sum(1 for name in weight_map if name.startswith("model.layers."))

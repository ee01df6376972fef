"""The kernel warm-up: which shapes it runs, and (on a GPU) that block 0's kernels are compiled by it."""

import json
import subprocess
import sys

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig
from rayquant.storage.generated import GENERATED_PRESETS
from rayquant.storage.model_source import open_model_source
from rayquant.storage.synthetic import PRESETS
from rayquant.workers import kernel_warmup
from rayquant.workers.adapter import build_skeleton, find_layout
from rayquant.workers.block_worker import BlockTask, BlockWorker
from rayquant.workers.kernel_warmup import (
    LinearShape, distinct_shapes, header_shapes, job_shapes, start_warm_up, warm_up,
)
from rayquant.workers.layer_overrides import LayerOverride
from rayquant.workers.moe import unfuse_experts
from structlog.testing import capture_logs
from tests.workers.test_block_worker import SAMPLES, _free_address, _setup

G128 = GPTQConfig(bits=4, group_size=128)
G64_8BIT = GPTQConfig(bits=8, group_size=64)


def test_distinct_shapes_keeps_one_per_shape_and_config_in_first_seen_order_and_skips_unquantized():
    linears = [(512, 256, G128), (256, 512, G128), (512, 256, G128), (512, 256, G64_8BIT), (64, 64, None)]
    assert distinct_shapes(linears) == [LinearShape(512, 256, G128), LinearShape(256, 512, G128),
                                        LinearShape(512, 256, G64_8BIT)]


# every decoder family's tiny model, and a full-size generated one (headers only); the generated DeepSeek-V3 and
# Qwen3-30B-A3B agree too but take 27 s of skeleton here (their tiny twins cover the same names)
HEADER_PRESETS = [p for p in PRESETS if p != "bert-tiny"] + ["llama-405b"]
# down projections (w2 in Mixtral, fc2 in OPT) in 8 bits, block 1's o_proj kept: a rule that splits one shape into two configs, one that skips
OVERRIDES = (LayerOverride(pattern=r".*\.(down_proj|w2|fc2)", bits=8),
             LayerOverride(pattern=r".*\.1\.self_attn\.o_proj", skip=True))


@pytest.mark.parametrize("preset", HEADER_PRESETS)
def test_shapes_from_the_headers_are_the_skeletons(preset):
    """The warm-up starts from the safetensors headers, before the skeleton exists: the same shapes and configs."""
    assert preset in PRESETS or preset in GENERATED_PRESETS
    source = open_model_source(f"synthetic://{preset}")
    model = build_skeleton(source.config, torch.bfloat16)
    unfuse_experts(model)
    layout = find_layout(model)
    blocks = model.get_submodule(layout.blocks_path)
    for overrides in ((), OVERRIDES):
        from_skeleton = job_shapes(blocks, layout, G128, overrides)
        assert set(header_shapes(source.tensors, G128, overrides)) == set(from_skeleton)
    assert any(s.cfg.bits == 8 for s in job_shapes(blocks, layout, G128, OVERRIDES))  # the rule took effect


def _block_0(warm: bool, monkeypatch) -> tuple[dict, list[dict]]:
    """Block 0 of the tiny Llama in-process, with or without the join's warm-up; its tensors and the log."""
    monkeypatch.setattr(kernel_warmup, "WARMUP_DEVICES", ("cuda", "cpu") if warm else ("cuda",))
    worker = BlockWorker(_setup())
    try:
        with capture_logs() as logs:
            worker.start(_free_address(), SAMPLES)
        return worker.run_block(BlockTask("test", 0)).tensors, logs
    finally:
        worker.stop()


def test_the_join_warms_up_the_headers_shapes_and_changes_no_byte(monkeypatch):
    """The path a GPU worker takes (started from the headers before the skeleton), run on the CPU."""
    warmed, logs = _block_0(True, monkeypatch)
    [done] = [e for e in logs if e["event"] == "kernels_warm"]
    assert done["shapes"] == 4 and not [e for e in logs if e["event"] == "kernel_warmup_missed_shapes"]
    plain, logs = _block_0(False, monkeypatch)
    assert not [e for e in logs if e["event"] == "kernels_warm"]
    assert warmed.keys() == plain.keys() and all(torch.equal(warmed[k], plain[k]) for k in plain)


def test_warm_up_runs_every_shape_through_the_solver_on_cpu():
    shapes = distinct_shapes([(256, 128, G128), (128, 256, G64_8BIT)])
    done = start_warm_up(shapes, torch.device("cpu"), torch.float32, torch.float64, validate_tokens=64)
    shapes_run, seconds = done.result(timeout=120)
    assert shapes_run == 2 and seconds > 0


# in a fresh interpreter: this process may have compiled the same kernel variants for other tests
_COUNT_COMPILED = """
import json, torch
from rayquant.kernels import triton_dequant_gemm
from rayquant.solver import gptq_fused, hessian_triton
from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.kernel_warmup import LinearShape, warm_up

kernels = (hessian_triton._xtx_tiles_kernel, gptq_fused._column_batch_kernel, triton_dequant_gemm._dequant_mm_kernel)
count = lambda: [sum(len(cache[0]) for cache in k.device_caches.values()) for k in kernels]
before = count()
warm_up([LinearShape(768, 1536, GPTQConfig(bits=4, group_size=128, act_group_aware=True))],
        torch.device("cuda"), torch.bfloat16, torch.float32, validate_tokens=64)
print(json.dumps({"before": before, "after": count()}))
"""


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (Triton kernels)")
def test_warm_up_compiles_the_hessian_fused_gptq_and_dequant_kernels_a_block_uses():
    out = subprocess.run([sys.executable, "-c", _COUNT_COMPILED], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["before"] == [0, 0, 0] and all(n > 0 for n in counts["after"]), counts

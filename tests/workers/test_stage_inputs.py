"""Stages that run a block child on its recorded calls collect bitwise the Hessians of the block forward."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from torch import nn

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.adapter import BlockInput, InputGroup
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup
from rayquant.workers.stage_inputs import StageInputs, once_called_children

from tests.e2e.models import REPO, SPEC, output_files, run_cli


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class RecordingWorker(BlockWorker):
    """The production worker, keeping a copy of what each stage collected and whether it replayed."""

    def __init__(self, setup: WorkerSetup, shortcut: bool):
        super().__init__(setup)
        self.stage_shortcut = shortcut
        self.collected: list[tuple[dict, dict, dict]] = []
        self.replayed: list[bool] = []

    def _collect(self, block, stage, stage_inputs, stage_idx, unread):
        collected = super()._collect(block, stage, stage_inputs, stage_idx, unread)
        self.collected.append(({k: v.clone() for k, v in collected.sums.items()}, dict(collected.tokens),
                               {k: v.clone() for k, v in collected.samples.items()}))
        self.replayed.append(stage_idx in stage_inputs.replayed)
        return collected


def _run_blocks(preset: str, shortcut: bool, device: str, blocks: int) -> tuple[RecordingWorker, list]:
    samples = torch.randint(2, 1024, (6, 64), generator=torch.Generator().manual_seed(0))
    setup = WorkerSetup(job_id="test", rank=0, world_size=1, model_path=f"synthetic://{preset}",
                        gptq=GPTQConfig(bits=4, group_size=128), true_sequential=True, micro_batch=4, device=device)
    worker = RecordingWorker(setup, shortcut)
    try:
        worker.start(_free_address(), samples)
        results = [worker.run_block(BlockTask("test", b)) for b in range(blocks)]
    finally:
        worker.stop()
    return worker, results


# per family and block, the stages (first input group) that must run on a child's recorded calls, and
# the child; OPT's fc1 and fc2 are children of the block themselves: its fc2 stage has no child to replay
_MLA = {"self_attn.q_b_proj": "self_attn", "self_attn.kv_b_proj": "self_attn", "self_attn.o_proj": "self_attn"}
REPLAYED = {
    "llama-tiny": [{"self_attn.o_proj": "self_attn", "mlp.down_proj": "mlp"}] * 2,
    "qwen2-moe-tiny": [{"self_attn.o_proj": "self_attn", "mlp.shared_expert.down_proj": "mlp",
                        "mlp.experts.0.gate_proj+up_proj": "mlp", "mlp.experts.0.down_proj": "mlp"}] * 2,
    # block 0 dense, block 1 routed experts before the shared expert
    "deepseek-v3-tiny": [_MLA | {"mlp.down_proj": "mlp"},
                         _MLA | {"mlp.experts.0.down_proj": "mlp", "mlp.shared_experts.gate_proj+up_proj": "mlp",
                                 "mlp.shared_experts.down_proj": "mlp"}],
    "opt-tiny": [{"self_attn.out_proj": "self_attn"}] * 2,
}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", list(REPLAYED))
def test_replayed_stages_collect_bitwise_the_hessians_of_the_block_forward(preset, device, debug_logs):
    on, on_results = _run_blocks(preset, shortcut=True, device=device, blocks=2)
    replay_logs = [e["stages"] for e in debug_logs if e["event"] == "stages_on_recorded_inputs"]
    off, off_results = _run_blocks(preset, shortcut=False, device=device, blocks=2)
    assert replay_logs == REPLAYED[preset]
    assert not any(off.replayed) and sum(on.replayed) == sum(len(r) for r in REPLAYED[preset])
    assert len(on.collected) == len(off.collected)
    for (sums, tokens, samples), (sums_off, tokens_off, samples_off) in zip(on.collected, off.collected):
        assert tokens == tokens_off and sums.keys() == sums_off.keys()
        for name in sums:
            assert torch.equal(sums[name], sums_off[name]), name
            assert torch.equal(samples[name], samples_off[name]), name
    for a, b in zip(on_results, off_results):
        assert a.layers == b.layers  # losses, token counts, MoE routed tokens
        assert a.tensors.keys() == b.tensors.keys()
        assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


class _Toy(nn.Module):
    """A block whose `mlp` child is called `mlp_calls` times; `attn` scales its input in place first if asked."""

    def __init__(self, mlp_calls: int = 1, in_place: bool = False):
        super().__init__()
        self.attn = nn.Sequential(nn.Linear(8, 8, bias=False))
        self.mlp = _ToyMLP(in_place)
        self.unused = nn.Linear(8, 8)
        self.mlp_calls = mlp_calls

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(x)
        for _ in range(self.mlp_calls):
            x = x + self.mlp(x)
        return x


class _ToyMLP(nn.Module):
    def __init__(self, in_place: bool):
        super().__init__()
        self.up, self.down, self.in_place = nn.Linear(8, 16, bias=False), nn.Linear(16, 8, bias=False), in_place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place:
            x.mul_(2)  # writes into the caller's tensor: a recorded call no longer holds the block's input
        return self.down(torch.relu(self.up(x)))


TOY_STAGES = [[InputGroup("attn.0", ("attn.0",), 8)], [InputGroup("mlp.up", ("mlp.up",), 8)],
              [InputGroup("mlp.down", ("mlp.down",), 16)]]


@pytest.mark.parametrize("mlp_calls", [0, 1, 2])
def test_only_children_called_once_per_forward_are_replayed(mlp_calls):
    block = _Toy(mlp_calls)
    once = once_called_children(block, BlockInput(torch.randn(2, 3, 8), ({},)))
    assert once == ({"attn", "mlp"} if mlp_calls == 1 else {"attn"})
    assert StageInputs(block, TOY_STAGES, once).holders == ["attn", "mlp" if mlp_calls == 1 else None,
                                                            "mlp" if mlp_calls == 1 else None]


def _toy_collect(block: _Toy, inputs: StageInputs, i: int, x: torch.Tensor) -> bool:
    """One stage of the toy as _collect runs it (no stop at the stage's linears); True if it replayed."""
    replay = inputs.recorded(i, 1)
    hooks = [] if replay is not None else inputs.record(i)
    if replay is not None:
        child, calls = replay
        child(*calls[0].args, **calls[0].kwargs)
    else:
        block(x)
    for h in hooks:
        h.remove()
    inputs.done(i)
    return replay is not None


@pytest.mark.parametrize("in_place", [False, True])
def test_a_recorded_input_written_in_place_is_not_replayed_and_calls_are_dropped_after_the_child(in_place):
    block = _Toy(in_place=in_place)
    x = torch.randn(2, 3, 8)
    inputs = StageInputs(block, TOY_STAGES, once_called_children(block, BlockInput(x.clone(), ({},))))
    assert [_toy_collect(block, inputs, i, x.clone()) for i in range(3)] == [False, False, not in_place]
    assert inputs.calls == [] and inputs.child is None


OFF_JOB = """
import sys
from pathlib import Path

from rayquant.jobs.driver import run_job
from rayquant.jobs.spec import load_spec
from rayquant.workers.block_worker import BlockWorker


class BlockForwardWorker(BlockWorker):
    stage_shortcut = False  # every stage runs the block forward


run_job(load_spec(Path(sys.argv[1]), sys.argv[2:]), worker_class=BlockForwardWorker)
"""


# qwen2-moe-tiny replays what llama-tiny does (self_attn, mlp children) and its experts too; llama-tiny's
# replay is checked bitwise in process above, its whole job only in the full matrix (two jobs, ~40 s)
@pytest.mark.slow
@pytest.mark.parametrize("preset", [pytest.param("llama-tiny", marks=pytest.mark.full_matrix), "qwen2-moe-tiny"])
def test_a_job_writes_the_same_bytes_with_and_without_replayed_stages(preset, tmp_path):
    sets = [f"model.source=synthetic://{preset}", "calibration.eval_samples=0"]
    on, off = tmp_path / "on", tmp_path / "off"
    # both jobs at once: one job alone keeps the 2 cores busy for less than half its time (start-up, Ray)
    with ThreadPoolExecutor(2) as pool:
        on_job = pool.submit(run_cli, "-v", "quantize", str(SPEC), *[a for s in sets for a in ("--set", s)],
                             "--set", f"output.uri={on}")
        off_job = pool.submit(subprocess.run, [sys.executable, "-c", OFF_JOB, str(SPEC), *sets, f"output.uri={off}"],
                              capture_output=True, text=True, timeout=600, cwd=REPO)
    proc = on_job.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    # the workers' debug line (JSON, forwarded by Ray with -v): the shortcut ran
    replays = [event["stages"] for event in _json_events(proc.stderr) if event.get("event") == "stages_on_recorded_inputs"]
    assert replays and replays[0] == REPLAYED[preset][0], proc.stderr[-3000:]
    assert "\x1b[" not in proc.stderr  # no colour codes in a file
    proc = off_job.result()
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert output_files(on) == output_files(off)


def _json_events(stderr: str) -> list[dict]:
    """Every JSON object in the output, also where Ray's log forwarding put two workers' lines on one."""
    decoder, events = json.JSONDecoder(), []
    for line in stderr.splitlines():
        at = line.find("{")
        while at != -1:
            try:
                event, end = decoder.raw_decode(line, at)
            except json.JSONDecodeError:
                at = line.find("{", at + 1)
                continue
            events.append(event)
            at = line.find("{", end)
    return events

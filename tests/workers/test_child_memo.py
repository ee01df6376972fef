"""Forwards of a child from its last linear's kept input give bitwise what the whole child computes."""

from __future__ import annotations

import socket

import pytest
import torch
from structlog.testing import capture_logs
from torch import nn

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.adapter import BlockInput, InputGroup
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup
from rayquant.workers.child_memo import ChildMemo, GpuRoom, memo_placement
from rayquant.workers.stage_inputs import once_called_children

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class _Worker(BlockWorker):
    def __init__(self, setup: WorkerSetup, memo: bool, on_host: bool | None):
        super().__init__(setup)
        self.child_memo, self.on_host = memo, on_host

    def _memo_placement(self, block: nn.Module, signature: tuple, planned_bytes: int) -> str | None:
        if self.on_host is None:
            return super()._memo_placement(block, signature, planned_bytes)
        return "host" if self.on_host else "device"


def _run_blocks(preset: str, memo: bool, device: str, on_host: bool | None = None, blocks: int = 2):
    """Blocks of a seeded tiny model on 3 micro-batches (the first checks both ways, the others shortcut)."""
    samples = torch.randint(2, 1024, (10, 64), generator=torch.Generator().manual_seed(0))
    setup = WorkerSetup(job_id="test", rank=0, world_size=1, model_path=f"synthetic://{preset}",
                        gptq=GPTQConfig(bits=4, group_size=128), true_sequential=True, micro_batch=4, device=device)
    worker = _Worker(setup, memo, on_host)
    try:
        worker.start(_free_address(), samples)
        results = []
        for b in range(blocks):
            results.append(worker.run_block(BlockTask("test", b)))
        hidden = [inp.hidden.cpu() for inp in worker.inputs]
    finally:
        worker.stop()
    return results, hidden


# per family and block, the children whose later forwards ran from their last linear's kept input; MoE MLPs
# route on their input and are never memoized; OPT's fc1/fc2 are children of the block, not of one child
_ATTN = {"self_attn": "self_attn.o_proj"}
MEMOIZED = {
    "llama-tiny": [_ATTN | {"mlp": "mlp.down_proj"}] * 2,
    "qwen2-moe-tiny": [_ATTN] * 2,
    "deepseek-v3-tiny": [_ATTN | {"mlp": "mlp.down_proj"}, _ATTN],
    "opt-tiny": [{"self_attn": "self_attn.out_proj"}] * 2,
}


# shortcut forwards per block over 3 micro-batches: attention's in each stage that runs the block forward
# after its o (the MLP's first; later MLP stages replay the MLP's call, but OPT's fc1 and fc2 are children of
# the block: two block forwards) and in the advance; the MLP's in the advance
SHORTCUTS = {"llama-tiny": [{"self_attn": 6, "mlp": 3}] * 2, "qwen2-moe-tiny": [{"self_attn": 6}] * 2,
             "deepseek-v3-tiny": [{"self_attn": 6, "mlp": 3}, {"self_attn": 6}], "opt-tiny": [{"self_attn": 9}] * 2}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("preset", list(MEMOIZED))
def test_memoized_children_advance_bitwise_as_the_whole_block(preset, device, debug_logs):
    on, on_hidden = _run_blocks(preset, memo=True, device=device)
    logs = [e for e in debug_logs if e["event"] == "child_memo"]
    off, off_hidden = _run_blocks(preset, memo=False, device=device)
    assert [(e["children"], e["dropped"]) for e in logs] == [(children, []) for children in MEMOIZED[preset]]
    assert [{c: n for c, n in e["shortcuts"].items() if n} for e in logs] == SHORTCUTS[preset]
    for a, b in zip(on, off, strict=True):
        assert a.layers == b.layers
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # the next block's inputs: what resume (which replays a block without its memo) advances from
    assert all(torch.equal(x, y) for x, y in zip(on_hidden, off_hidden, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned host memory and a copy stream need CUDA")
def test_a_memo_in_host_memory_advances_bitwise_as_one_on_the_gpu():
    host, host_hidden = _run_blocks("llama-tiny", memo=True, device="cuda", on_host=True)
    gpu, gpu_hidden = _run_blocks("llama-tiny", memo=True, device="cuda", on_host=False)
    assert all(torch.equal(x, y) for x, y in zip(host_hidden, gpu_hidden, strict=True))
    assert all(a.layers == b.layers for a, b in zip(host, gpu))


class _Attn(nn.Module):
    """o(relu(v(x))), plus `leak`·v(x) straight into the output when asked: then the output reads v other
    than through o's input, and a memo computing v as zeros would be wrong."""

    def __init__(self, leak: bool):
        super().__init__()
        self.v, self.o, self.leak = nn.Linear(8, 8, bias=False), nn.Linear(8, 8, bias=False), leak

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        h = self.v(x)
        out = self.o(torch.relu(h))
        return (out + 0.5 * h if self.leak else out), None


class _Block(nn.Module):
    def __init__(self, leak: bool):
        super().__init__()
        self.attn = _Attn(leak)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(x)[0]


STAGES = [[InputGroup("attn.v", ("attn.v",), 8)], [InputGroup("attn.o", ("attn.o",), 8)]]


@pytest.mark.parametrize("leak", [False, True])
def test_a_child_whose_output_reads_another_linear_directly_loses_its_memo(leak):
    torch.manual_seed(0)
    block = _Block(leak)
    xs = [torch.randn(2, 3, 8) for _ in range(3)]
    memo = ChildMemo(block, STAGES, once_called_children(block, BlockInput(xs[0], ({},))), torch.device("cpu"))
    assert [c.name for c in memo.children] == ["attn"]
    hooks = memo.keep_hooks(1)  # stage 1 (o) collects: the keep
    with memo.run(len(xs)):
        for k, x in enumerate(xs):
            with memo.micro_batch(k):
                block(x)
    for h in hooks:
        h.remove()
    v_outputs = []
    handle = block.attn.v.register_forward_hook(lambda _m, _a, out: v_outputs.append(out))
    with capture_logs() as logs, memo.run(len(xs)):  # a later pass: the advance
        outs = []
        for k, x in enumerate(xs):
            with memo.micro_batch(k):
                outs.append(block(x))
    handle.remove()
    assert all(torch.equal(out, x + block.attn(x)[0]) for out, x in zip(outs, xs))
    assert memo.dropped() == (["attn"] if leak else [])
    assert [e["event"] for e in logs] == (["child_memo_dropped"] if leak else [])
    # micro-batch 0 runs v twice (whole child, then the checked shortcut's zeros); the others once: zeros with
    # the memo, v(x) in full without
    assert len(v_outputs) == 4
    assert (not v_outputs[2].any() and not v_outputs[3].any()) == (not leak)


GIB = 2**30


@pytest.mark.parametrize("planned, gpu, host, where", [
    (0, None, 0, "device"),  # nothing to keep
    (3 * GIB, None, 20 * GIB, "device"),  # a CPU worker keeps it in its own memory
    (15 * GIB, None, 20 * GIB, None),  # the CPU 8B's memo would take most of the host: none
    (9.6 * GIB, GpuRoom(80 * GIB, None), 100 * GIB, "device"),  # the 8B's first block: small beside the GPU
    (36.5 * GIB, GpuRoom(80 * GIB, None), 100 * GIB, "host"),  # the 405B's first block
    (8.6 * GIB, GpuRoom(80 * GIB, None, moe=True), 100 * GIB, "host"),  # DeepSeek-V3's first MoE block
    (36.5 * GIB, GpuRoom(80 * GIB, (72.3 * GIB, 36.5 * GIB)), 100 * GIB, "host"),  # its peak left no room
    (19.3 * GIB, GpuRoom(80 * GIB, (30 * GIB, 19.3 * GIB)), 100 * GIB, "device"),  # a 70B-like block's did
    (36.5 * GIB, GpuRoom(80 * GIB, (72.3 * GIB, 36.5 * GIB)), 60 * GIB, None),  # no room on either
])
def test_the_memo_goes_where_it_fits(planned, gpu, host, where):
    assert memo_placement(int(planned), gpu, int(host)) == where

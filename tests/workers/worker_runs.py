"""One in-process worker on a seeded tiny preset: its first blocks, with the worker's switches set."""

from __future__ import annotations

import socket

import torch

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.block_worker import BlockResult, BlockTask, BlockWorker, WorkerSetup


def free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def run_blocks(preset: str, device: str, n_samples: int, blocks: int = 2, **switches: bool) -> list[BlockResult]:
    """`blocks` blocks of synthetic://<preset> on n_samples windows of 64 tokens (micro-batches of 4), 4-bit
    g128, one rank; `switches` set on the worker (e.g. skip_unread_experts=False)."""
    samples = torch.randint(2, 1024, (n_samples, 64), generator=torch.Generator().manual_seed(0))
    setup = WorkerSetup(job_id="test", rank=0, world_size=1, model_path=f"synthetic://{preset}",
                        gptq=GPTQConfig(bits=4, group_size=128), true_sequential=True, micro_batch=4, device=device)
    worker = BlockWorker(setup)
    for name, value in switches.items():
        assert hasattr(BlockWorker, name), name
        setattr(worker, name, value)
    try:
        worker.start(free_address(), samples)
        return [worker.run_block(BlockTask("test", b)) for b in range(blocks)]
    finally:
        worker.stop()

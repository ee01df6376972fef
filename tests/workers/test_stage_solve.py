"""Batched solves in the worker (workers/stage_solve.py): a tiny MoE block quantized with every expert of a
stage in one batched call gives the same bytes and reports as solving each input group in a call of its own."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup

SAMPLES = torch.randint(2, 1000, (4, 32), generator=torch.Generator().manual_seed(3))


class OneGroupPerCall(BlockWorker):
    """The unbatched path: every input group solved, baselined and validated in calls of its own."""

    calls = 0

    def _solve_groups(self, block_idx, block, works):
        packed, reports = {}, []
        for work in works:
            one, r = super()._solve_groups(block_idx, block, [work])
            packed.update(one)
            reports += r
            OneGroupPerCall.calls += 1
        return packed, reports


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


def _run(worker_class, preset: str, cfg: GPTQConfig, **setup):
    worker = worker_class(WorkerSetup(job_id="t", rank=0, world_size=1, model_path=f"synthetic://{preset}", gptq=cfg,
                                      true_sequential=True, micro_batch=2, **setup))
    worker.start(_free_address(), SAMPLES)
    try:
        result = worker.run_block(BlockTask(job_id="t", block_idx=0))
        return result.tensors, {r.name: r for r in result.layers}
    finally:
        worker.stop()


@pytest.mark.parametrize("preset,cfg", [("qwen3-moe-tiny", GPTQConfig(act_group_aware=True)),
                                        ("mixtral-tiny", GPTQConfig(desc_act=True, sym=False, group_size=32))])
def test_batched_stage_equals_one_group_per_call(preset, cfg):
    OneGroupPerCall.calls = 0
    batched_tensors, batched_reports = _run(BlockWorker, preset, cfg)
    alone_tensors, alone_reports = _run(OneGroupPerCall, preset, cfg)
    experts = [n for n in batched_reports if ".experts." in n]
    assert len(experts) >= 12 and OneGroupPerCall.calls > len(experts) // 3  # the experts were solved one by one
    assert batched_tensors.keys() == alone_tensors.keys()
    for name, tensor in batched_tensors.items():
        assert torch.equal(tensor, alone_tensors[name]), name
    # kernel validation errors differ: a batch validates its experts on rows of every expert's input
    assert _without_validation(batched_reports) == _without_validation(alone_reports)
    assert all(r.max_rel_err < 1e-5 for r in batched_reports.values())


def _without_validation(reports: dict) -> dict:
    return {name: dataclasses.replace(r, max_rel_err=0.0, mean_rel_err=0.0) for name, r in reports.items()}


@pytest.mark.parametrize("hessian_tokens", ["routed", "all"])
def test_expert_stages_cut_by_hessian_memory_give_the_same_bytes(monkeypatch, hessian_tokens):
    """Expert stages cut into stages of a few experts each (EXPERT_STAGE_HESSIAN_BYTES; each cut stage runs
    only its own experts while it collects) quantize the block to the same bytes and reports."""
    from rayquant.workers import moe

    cfg = GPTQConfig(act_group_aware=True)
    setup = dict(moe=moe.MoEConfig(hessian_tokens=hessian_tokens))
    whole_tensors, whole_reports = _run(BlockWorker, "qwen3-moe-tiny", cfg, **setup)
    monkeypatch.setattr(moe, "EXPERT_STAGE_HESSIAN_BYTES", 3 * 128 * 128 * 8)  # 3 experts of K = 128 (fp64 on CPU)
    ran: list[frozenset[int]] = []
    forward = moe.RoutedExperts.forward

    def recording(self, *args):
        if self.collector is not None:
            ran.append(frozenset(self.collector.experts))
        return forward(self, *args)
    monkeypatch.setattr(moe.RoutedExperts, "forward", recording)
    cut_tensors, cut_reports = _run(BlockWorker, "qwen3-moe-tiny", cfg, **setup)
    assert {3, 2} <= {len(o) for o in ran}  # stages of 3 experts (8 = 3 + 3 + 2) ran
    for name, tensor in whole_tensors.items():
        assert torch.equal(tensor, cut_tensors[name]), name
    assert _without_validation(whole_reports) == _without_validation(cut_reports)

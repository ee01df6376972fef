"""The block worker in-process (as GPU benchmarks run it), one rank, on the tiny Llama."""

from __future__ import annotations

import dataclasses
import socket

import pytest
import torch

from rayquant.kernels.validation import KernelMismatch
from rayquant.solver.gptq import GPTQConfig, GPTQResult
from rayquant.solver.pack import PackedLinear
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup


SAMPLES = torch.randint(2, 1024, (4, 64), generator=torch.Generator().manual_seed(0))


def _setup() -> WorkerSetup:
    return WorkerSetup(job_id="test", rank=0, world_size=1, model_path="synthetic://llama-tiny",
                       gptq=GPTQConfig(bits=4, group_size=128), true_sequential=True, micro_batch=2)


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


class CorruptScaleWorker(BlockWorker):
    """Packs one layer with a doubled scale, as a buggy packer or kernel would."""

    def _pack(self, results: list[GPTQResult], bits: int) -> list[PackedLinear]:
        return [self._corrupt(result, packed) for result, packed in zip(results, super()._pack(results, bits))]

    def _corrupt(self, result: GPTQResult, packed: PackedLinear) -> PackedLinear:
        if result.codes.shape == (256, 128):  # gate_proj / up_proj
            scales = packed.scales.clone()
            scales[0, :4] *= 2
            packed = dataclasses.replace(packed, scales=scales)
        return packed


def test_one_block_in_process_beats_rtn_and_packs_every_linear():
    worker = BlockWorker(_setup())
    try:
        assert worker.start(_free_address(), SAMPLES) == 4
        result = worker.run_block(BlockTask("test", 0))
    finally:
        worker.stop()
    assert len(result.layers) == 7
    assert all(x.gptq_loss < x.rtn_loss for x in result.layers)
    assert all(x.max_rel_err < 1e-3 for x in result.layers)
    assert "model.layers.0.mlp.down_proj.qweight" in result.tensors
    assert "model.layers.0.mlp.down_proj.weight" not in result.tensors
    assert result.tensors["model.layers.0.input_layernorm.weight"].dtype == torch.bfloat16


def test_a_layer_whose_kernel_output_disagrees_fails_validation_naming_it():
    worker = CorruptScaleWorker(_setup())
    try:
        worker.start(_free_address(), SAMPLES)
        with pytest.raises(KernelMismatch, match=r"block 0 layer model\.layers\.0\.mlp\.gate_proj"):
            worker.run_block(BlockTask("test", 0))
    finally:
        worker.stop()


class SourceKeepingWorker(BlockWorker):
    """Keeps each quantized block's source tensors (the dict its stages free weights from) for the test."""

    def _quantize(self, block_idx, source):
        self.kept_source = source
        return super()._quantize(block_idx, source)


def test_a_block_frees_each_source_weight_once_its_quantized_copy_is_installed():
    """The block's weights are held once: every quantized linear's source `.weight` is freed by the end (the
    block holds its dequantized codes), the other tensors stay; the eval streams moved through the source
    before that, and the rtn one through the rounded source weights."""
    setup = dataclasses.replace(_setup(), eval_on=True, eval_rtn=True)
    worker = SourceKeepingWorker(setup)
    try:
        worker.start(_free_address(), SAMPLES, SAMPLES[:2])
        result = worker.run_block(BlockTask("test", 0))
        streams = {name: [inp.hidden for inp in stream] for name, stream in worker.eval.streams.items()}
    finally:
        worker.stop()
    quantized = {n.removesuffix(".qweight") + ".weight" for n in result.tensors if n.endswith(".qweight")}
    assert len(quantized) == 7
    assert {n for n, t in worker.kept_source.items() if t.is_meta} == quantized
    assert all(t.dtype == torch.bfloat16 for n, t in result.tensors.items() if n.endswith("norm.weight"))
    # three streams, each moved by the block in its own way
    assert not torch.equal(streams["fp"][0], streams["gptq"][0])
    assert not torch.equal(streams["fp"][0], streams["rtn"][0])
    assert not torch.equal(streams["gptq"][0], streams["rtn"][0])

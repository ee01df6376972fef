"""In-pass evaluation: this rank's held-out windows flow through every block beside the calibration shard.

Each stream has its own version of each block: fp (the source tensors), gptq (the quantized block the
shard advances through) and, with `eval_rtn`, rtn. After the last block the model's own final norm and
head turn each stream into logits (DESIGN.md §6).
"""

from __future__ import annotations

import torch
from torch import nn

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.rtn import rtn_weight
from rayquant.storage.model_source import ModelSource, read_source_tensor
from rayquant.workers.adapter import (
    BlockInput,
    DecoderLayout,
    capture_block_inputs,
    final_logits,
    forward_block,
    materialize,
    materialize_embedding_stage,
    tie_output_head,
)
from rayquant.workers.evaluation import window_nll
from rayquant.workers.layer_overrides import LayerOverride, layer_config
from rayquant.workers.rank_group import RankGroup, agree_on_errors


class EvalStreams:
    """The held-out windows' token ids and, per stream (fp / gptq / rtn), their hidden states at the next block."""

    def __init__(self, model: nn.Module, layout: DecoderLayout, group: RankGroup, dtype: torch.dtype,
                 windows: list[torch.Tensor], rtn: bool, gptq: GPTQConfig, overrides: tuple[LayerOverride, ...]):
        """`windows`: this rank's eval windows in micro-batches [b, T] (may be none); every stream starts
        from their block-0 inputs. `gptq` and `overrides` give the RTN stream each linear's bits and groups."""
        self.model, self.layout, self.group, self.dtype = model, layout, group, dtype
        self.blocks = model.get_submodule(layout.blocks_path)
        self.gptq, self.overrides = gptq, overrides
        self.ids = windows
        first = [capture_block_inputs(model, layout, ids.to(group.device)) for ids in windows]
        names = ("fp", "gptq", "rtn") if rtn else ("fp", "gptq")
        self.streams = {name: list(first) for name in names}

    def advance_reference(self, block_idx: int, source: dict[str, torch.Tensor], quantized: set[str]) -> None:
        """Move the fp stream (and the rtn stream) through block `block_idx` built from its `source` tensors
        (full names), before the block is quantized: the worker then frees each linear's source weight as its
        quantized copy is installed. `quantized`: the linears (names relative to the block) the GPTQ part
        replaces, which the rtn stream rounds to nearest at the same bits and groups."""
        prefix = self.layout.block_prefix(block_idx)
        fp_state = {n[len(prefix):]: t for n, t in source.items()}
        self._move("fp", materialize(self.blocks[block_idx], fp_state, self.dtype))
        if "rtn" in self.streams:
            rtn_state = dict(fp_state)
            for linear in sorted(quantized):
                cfg = layer_config(prefix + linear, self.gptq, self.overrides)  # the GPTQ codes' bits / groups
                rtn_state[f"{linear}.weight"] = rtn_weight(fp_state[f"{linear}.weight"].to(self.group.device), cfg)
            self._move("rtn", materialize(self.blocks[block_idx], rtn_state, self.dtype))

    def advance_quantized(self, quantized: nn.Module) -> None:
        """Move the gptq stream through the quantized block the calibration shard advanced through."""
        self._move("gptq", quantized)

    def _move(self, name: str, block: nn.Module) -> None:
        self.streams[name] = [inp.advanced(forward_block(block, inp)) for inp in self.streams[name]]

    def evaluate(self, source: ModelSource) -> dict[str, tuple[float, int]]:
        """Per stream: summed next-token NLL and predicted tokens over every rank's windows (added in rank
        order: the same floats on every rank). Call after the last block; every rank calls it."""
        with agree_on_errors(self.group):
            self._load_head(source)
            totals = {name: self._nll(stream) for name, stream in self.streams.items()}
        out = {}
        for name in sorted(totals):
            parts = self.group.all_gather(torch.tensor(totals[name], dtype=torch.float64, device=self.group.device))
            out[name] = (sum(float(p[0]) for p in parts), sum(int(p[1]) for p in parts))
        return out

    def _load_head(self, source: ModelSource) -> None:
        names = [n for n in self.layout.head_names if n in source.tensors]
        materialize_embedding_stage(self.model, {n: read_source_tensor(source, n, self.group.device) for n in names},
                                    self.dtype)
        tie_output_head(self.model)

    def _nll(self, stream: list[BlockInput]) -> tuple[float, int]:
        nll, count = 0.0, 0
        for ids, inp in zip(self.ids, stream):
            for i in range(len(ids)):  # one window at a time: [T, vocab] logits stay small
                window = ids[i:i + 1].to(self.group.device)
                logits = final_logits(self.model, self.layout, inp.hidden[i:i + 1], window)
                part_nll, part_count = window_nll(logits, window)
                nll, count = nll + part_nll, count + part_count
        return nll, count

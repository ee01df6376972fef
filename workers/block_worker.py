"""The block worker: keeps one calibration shard for the whole job and runs block stages.

A plain class: `jobs` makes it a Ray actor in one place; GPU benchmarks build it in-process, one
process per GPU. All W workers form one torch.distributed group (Gloo on CPU, NCCL on GPU) and call
the same collectives in the same order, so each method must be entered by every rank.

Per block (DESIGN.md §5): load (each rank reads 1/W of the tensors, broadcasts them) →
per sub-stage: collect Σxᵀx → reduce to the input group's owner, or to every rank for a row-split stage
(rank-ordered sums) → solve → validate
→ share packed tensors → advance the shard through the *quantized* block.
"""

from __future__ import annotations

import resource
import time
from collections.abc import Iterator
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
import torch
import torch.distributed as dist
from torch import nn

from rayquant.kernels.dequant_gemm import dequant_gemm
from rayquant.kernels.validation import KernelMismatch, validate_packed_layer
from rayquant.solver.gptq import GPTQConfig, GPTQResult, HessianNotPositiveDefinite, dequantize, solve_input_group
from rayquant.solver.hessian import accumulate_hessian, mirror_upper
from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed, pack_linear, packed_bits, packed_shapes
from rayquant.solver.rtn import quantize_rtn, rtn_weight
from rayquant.storage.model_source import ModelSource, open_model_source, read_source_tensor
from rayquant.storage.safetensors_reader import DTYPES, TensorInfo
from rayquant.workers.block_writer import BlockWriter, OutputTarget, read_durable_block
from rayquant.workers.output_plan import plan_output
from rayquant.workers.kernel_warmup import finish_warm_up, job_shapes, start_warm_up
from rayquant.workers.prefetch import Prefetch
from rayquant.storage.job_records import LayerReport
from rayquant.storage.shard_plan import ShardPlan
from rayquant.workers.evaluation import window_nll
from rayquant.workers.adapter import (
    BlockInput,
    InputGroup,
    build_skeleton,
    capture_block_inputs,
    embedding_stage_names,
    final_logits,
    find_input_groups,
    find_layout,
    forward_block,
    tie_output_head,
    materialize,
    materialize_embedding_stage,
    move_buffers,
)
from rayquant.workers.collectives import free_tcp_address, gather_sum, sum_to_all_
from rayquant.workers.layer_overrides import LayerOverride, layer_config
from rayquant.workers.row_split import OUTPUT_DIM, concat_packed, row_bounds
from rayquant.workers.stage_inputs import StageInputs, once_called_children
from rayquant.workers.moe import (
    MoEConfig,
    StarvedExpert,
    expert_of,
    local_routed_tokens,
    reset_routed_tokens,
    sequential_stages,
    set_calibration,
    shared_hessians,
    unfuse_experts,
)

log = structlog.get_logger()


class _StageCollected(Exception):
    """Raised by the last Hessian hook of a stage to end the forward pass early."""


class PeerFailed(Exception):
    """Another worker failed in this stage; its own error is the one to read."""


@dataclass(frozen=True)
class WorkerSetup:
    """Everything a worker needs for the whole job; built by the driver from the spec."""

    job_id: str
    rank: int
    world_size: int
    model_path: str  # model.source as this node reads it: a (shared) local directory or synthetic://<preset>
    gptq: GPTQConfig
    true_sequential: bool
    micro_batch: int = 8  # samples per forward; bounds activation memory of one step
    num_threads: int = 1
    device: str = "cpu"
    loopback: bool = True  # single-node (embedded Ray, in-process benchmarks): rendezvous on 127.0.0.1
    validate_tokens: int = 64  # rows of each group's input kept for kernel validation
    validate_tolerance: float = 1e-2  # max relative error of kernel vs dequantized reference
    eval_on: bool = False  # in-pass eval: held-out windows flow fp and quantized (the same on every rank)
    eval_rtn: bool = False  # also flow the eval windows through RTN blocks (a third stream)
    moe: MoEConfig = MoEConfig()  # MoE models: what a starved expert gets
    overrides: tuple[LayerOverride, ...] = ()  # quant.overrides: per-linear bits / group_size / skip
    # stages with fewer input groups than ranks: every rank solves a slice of each linear's rows
    # (workers/row_split.py); False: each group's owner solves all of it (for benchmark comparisons)
    split_rows: bool = True


@dataclass(frozen=True)
class BlockTask:
    job_id: str
    block_idx: int
    replay: bool = False  # the block is durable in its shard: read it back, advance only (resume)


@dataclass(frozen=True)
class BlockResult:
    block_idx: int
    rank: int
    seconds: dict[str, float]
    layers: list[LayerReport] = field(default_factory=list)
    tensors: dict[str, torch.Tensor] | None = None  # rank 0 without set_output: the block's tensors (output names)
    peak_memory_bytes: int = 0  # GPU: peak allocated in this block; CPU: the process's peak RSS so far
    bytes_received: dict[str, int] = field(default_factory=dict)  # per stage, by this rank (sum over ranks = traffic)
    rows_solved: int = 0  # output rows this rank ran GPTQ on, over all linears of the block


class BlockWorker:
    """One rank of the job: a calibration shard, a process group, and the block stages."""

    # true_sequential stages inside one child (attention's o, the MLP's down) run that child on its
    # recorded input instead of the whole block (workers/stage_inputs.py); False: the block forward
    stage_shortcut = True

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.rank, self.world = setup.rank, setup.world_size
        self.device = torch.device(setup.device)
        self.dtype = torch.float32 if self.device.type == "cpu" else torch.bfloat16
        # On CPU the Hessian sums are float64: rounding them to fp32 once, after the reduce, makes
        # them (almost always bit-)identical whatever the worker count. On GPU, fp32 for speed.
        self.hessian_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.source: ModelSource | None = None
        self.inputs: list[BlockInput] = []
        # in-pass evaluation: the held-out windows' hidden states per stream (fp / gptq / rtn)
        self.eval_ids: list[torch.Tensor] = []
        self.eval_streams: dict[str, list[BlockInput]] = {}
        self.received: dict[str, int] = {}  # bytes this rank received per stage, for the current block
        self.rows_solved = 0  # output rows solved on this rank, for the current block
        self._groups_by_structure: dict[tuple, list[InputGroup]] = {}
        self._once_called_by_structure: dict[tuple, frozenset[str]] = {}  # children one block forward calls once
        self.stage: tuple[int | None, str] = (None, "starting")  # (block, stage) now running, for progress
        self.output: OutputTarget | None = None  # set by set_output()
        self.writer: BlockWriter | None = None  # rank 0 with an output: writes blocks in the background
        self._prefetch = Prefetch()  # this rank's share of the next block, read while this one computes
        self._warm_up: Future | None = None  # GPU: block kernels compiling on a thread (workers/kernel_warmup.py)

    # ---- lifetime ---------------------------------------------------------------------------

    def rendezvous_address(self) -> str:
        """A free TCP address on this worker's node for the process group's store (asked of rank 0)."""
        return free_tcp_address(self.setup.loopback)

    def start(self, rendezvous: str, samples: torch.Tensor, eval_samples: torch.Tensor | None = None) -> int:
        """join() then embed(), for callers that have the calibration windows already (in-process
        benchmarks and tests). Returns the block count."""
        n_blocks = self.join(rendezvous)
        self.embed(samples, eval_samples)
        return n_blocks

    def join(self, rendezvous: str) -> int:
        """Everything before the calibration windows: the process group, the model's skeleton, the
        embedding stage's weights on the device. Returns the block count.

        The job calls it as soon as the actor exists, so it runs while the driver cuts the windows."""
        self._bind(block=None)
        torch.set_num_threads(self.setup.num_threads)  # a reused Ray worker may keep 1
        torch.manual_seed(0)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)  # NCCL binds each rank to its current device
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=rendezvous, rank=self.rank,
                                world_size=self.world, timeout=timedelta(minutes=30))
        with self._peers_agree():
            self.source = open_model_source(self.setup.model_path)
            self.model = build_skeleton(self.source.config, self.dtype)
            unfuse_experts(self.model)  # MoE: one linear per expert, under the checkpoint's names
            self.layout = find_layout(self.model)
            self.blocks = self.model.get_submodule(self.layout.blocks_path)
            names = embedding_stage_names(self.model, self.layout)
            tensors = {n: read_source_tensor(self.source, n, self.device) for n in names if n in self.source.tensors}
            materialize_embedding_stage(self.model, tensors, self.dtype)
            move_buffers(self.model, self.device)
        if self.device.type == "cuda":  # compile block 0's kernels while the driver cuts the windows
            shapes = job_shapes(self.blocks, self.layout, self.setup.gptq, self.setup.overrides)
            self._warm_up = start_warm_up(shapes, self.device, self.dtype, self.hessian_dtype, self.setup.validate_tokens)
        log.info("worker_joined", rank=self.rank, blocks=self.layout.n_blocks)
        return self.layout.n_blocks

    def embed(self, samples: torch.Tensor, eval_samples: torch.Tensor | None = None) -> None:
        """Embed this rank's calibration shard `samples` [n_w, T] and its held-out windows `eval_samples`
        [e_w, T] (if setup.eval_on): the block-0 inputs every later block advances."""
        self._bind(block=None)
        with self._peers_agree():
            for ids in samples.split(self.setup.micro_batch):
                self.inputs.append(capture_block_inputs(self.model, self.layout, ids.to(self.device)))
            self._start_eval(eval_samples)
        if self._warm_up is not None:
            finish_warm_up(self._warm_up)
            self._warm_up = None
        log.info("worker_started", rank=self.rank, samples=len(samples))

    def plan_output(self, max_shard_bytes: int) -> ShardPlan:
        """The checkpoint's shard plan, from this worker's skeleton (asked of rank 0 after join(), so the
        driver never imports transformers' model classes just to plan)."""
        return plan_output(self.source, self.model, self.layout, self.setup.gptq, self.setup.overrides,
                           max_shard_bytes)

    def set_output(self, output: OutputTarget) -> None:
        """Where rank 0 writes each quantized block (its planned shard) on a background thread, and every
        rank reads replayed blocks back from. Without it rank 0 returns the block's tensors in
        BlockResult.tensors instead (in-process callers)."""
        self.output = output
        if self.rank == 0:
            self.writer = BlockWriter(output)

    def stop(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()

    def current_stage(self) -> tuple[int | None, str]:
        """(block, stage) this rank is in; called from a second actor thread while a block runs."""
        return self.stage

    # ---- one block ----------------------------------------------------------------------------

    @torch.no_grad()
    def run_block(self, task: BlockTask) -> BlockResult:
        """Quantize block `task.block_idx` (or replay it from its shard) and advance the calibration shard.

        Rank 0 queues the quantized block for its background writer (set_output) and returns without
        waiting for the disk; `wait_durable` says when the bytes are on disk."""
        self._bind(block=task.block_idx)
        self.stage = (task.block_idx, "load")
        seconds: dict[str, float] = {}
        self.received, self.rows_solved = {}, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        source_tensors = None
        if not task.replay or self._eval_on:  # a replayed block still moves the fp eval stream
            with self._timed("load", seconds):
                source_tensors = self._load(task.block_idx)
            if task.block_idx + 1 < self.layout.n_blocks:
                self._prefetch.start(task.block_idx + 1, self._read_share, self.device)
        if task.replay:
            part = read_durable_block(self.output, task.block_idx)
            layers: list[LayerReport] = []
        else:
            part, layers = self._quantize(task.block_idx, source_tensors, seconds)
        # rank 0 copies the block to host memory for the writer; the copy overlaps the advance
        with self._timed("handoff", seconds):
            to_host = _HostCopy(part, self.device) if self.rank == 0 and not task.replay else None
        with self._timed("advance", seconds):
            quantized = self._advance(task.block_idx, part)
        if self._eval_on:
            with self._timed("eval", seconds):
                self._advance_eval(task.block_idx, quantized, part, source_tensors)
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # process peak RSS (KiB on Linux)
        log.info("block_stages_done", rank=self.rank, replay=task.replay,
                 **{k: round(v, 3) for k, v in seconds.items()})
        host_part = None
        with self._timed("handoff", seconds):  # waits only while the writer has a block queued already
            if to_host is not None and self.writer is not None:
                self.writer.submit(task.block_idx, to_host)
            elif to_host is not None:
                host_part = to_host.result()
        return BlockResult(block_idx=task.block_idx, rank=self.rank, seconds=seconds, layers=layers,
                           tensors=host_part, peak_memory_bytes=peak,
                           bytes_received=dict(self.received), rows_solved=self.rows_solved)

    def wait_durable(self, block_idx: int) -> float:
        """Seconds rank 0's writer took for block block_idx, once its bytes are fsynced (0 elsewhere).

        Called from a second actor thread while the next block runs.

        Raises:
            the write's error (a full disk, a removed output directory).
        """
        return self.writer.wait_durable(block_idx) if self.writer is not None else 0.0

    def _load(self, block_idx: int) -> dict[str, torch.Tensor]:
        """Read 1/W of the block's tensors (largest first, to the least-loaded rank), broadcast the rest.

        This rank's share was usually read while the previous block computed (workers/prefetch.py)."""
        infos, readers = self._shares(block_idx)
        mine: dict[str, torch.Tensor] = {}
        with self._peers_agree():
            mine = self._prefetch.take(block_idx) or self._read_share(block_idx)
        out = {}
        for name in sorted(infos):
            info = infos[name]
            template = mine.get(name)
            if template is None:
                template = torch.empty(info.shape, dtype=DTYPES[info.dtype], device=self.device)
            out[name] = self._broadcast(template, src=readers[name], stage="load")
        return out

    def _shares(self, block_idx: int) -> tuple[dict[str, TensorInfo], dict[str, int]]:
        """The block's source tensors and the rank that reads each."""
        prefix = self.layout.block_prefix(block_idx)
        infos = {n: i for n, i in self.source.tensors.items() if n.startswith(prefix)}
        return infos, _balance({n: i.end - i.start for n, i in infos.items()}, self.world)

    def _read_share(self, block_idx: int) -> dict[str, torch.Tensor]:
        """This rank's 1/W of the block's source tensors, on its device."""
        _, readers = self._shares(block_idx)
        return {name: read_source_tensor(self.source, name, self.device)
                for name, reader in readers.items() if reader == self.rank}

    def _quantize(self, block_idx: int, source: dict[str, torch.Tensor],
                  seconds: dict[str, float]) -> tuple[dict[str, torch.Tensor], list[LayerReport]]:
        with self._timed("plan", seconds):
            prefix = self.layout.block_prefix(block_idx)
            local = {n[len(prefix):]: t for n, t in source.items()}
            block = materialize(self.blocks[block_idx], local, self.dtype)
            set_calibration(block, True)  # MoE: every expert sees every token, so every expert is a group
            # blocks of one structure group their linears alike: one probe forward per structure, not per block
            signature = _structure(block)
            if signature not in self._groups_by_structure:
                self._groups_by_structure[signature] = find_input_groups(block, self.inputs[0])
                self._once_called_by_structure[signature] = once_called_children(block, self.inputs[0])
            groups = self._groups_by_structure[signature]
        owners = _balance({g.name: g.in_features ** 2 for g in groups}, self.world)
        stages = sequential_stages(block, groups) if self.setup.true_sequential else [groups]
        packed: dict[str, PackedLinear] = {}
        layers: list[LayerReport] = []
        stage_inputs = StageInputs(block, stages, self._once_called_by_structure[signature], self.stage_shortcut)
        for i, stage in enumerate(stages):
            # all tokens through all experts only where an expert's Hessian is collected; the output is the same
            set_calibration(block, any(expert_of(block, g) is not None for g in stage))
            reset_routed_tokens(block)
            aliases = shared_hessians(block, stage)  # MoE: one all-token Hessian for every expert's gate/up
            collected = [g for g in stage if g.name not in aliases]
            sums, tokens, samples = self._collect(block, collected, seconds, stage_inputs, i)
            routed = self._routed_tokens(block_idx, block, stage)
            split = self._splits_rows(stage, aliases)
            with self._timed("reduce", seconds):
                if split:
                    reduced = {g.name: self._reduce_to_all(sums[g.name], tokens[g.name]) for g in collected}
                else:
                    reduced = {g.name: self._reduce(sums[g.name], tokens[g.name], owners[g.name]) for g in collected}
                for first in sorted(set(aliases.values())):  # the same order on every rank
                    reduced[first] = self._share_hessian(reduced[first], owners[first], sums[first])
                for name, first in aliases.items():
                    reduced[name], samples[name] = reduced[first], samples[first]
            mine: dict[str, PackedLinear] = {}  # split: this rank's row slices
            slice_reports: dict[str, LayerReport] = {}  # split: this rank's slices' losses and errors
            with self._peers_agree():
                for g in stage:
                    if split or owners[g.name] == self.rank:
                        H, n = reduced[g.name]
                        for linears, cfg in self._configs_of(block_idx, g):
                            rows = self._my_rows(block, linears) if split else None
                            linears = tuple(lin for lin in linears if rows is None or rows[lin][0] < rows[lin][1])
                            if not linears:
                                continue  # every slice of this rank is empty
                            part_of_g = InputGroup(name=g.name, linears=linears, in_features=g.in_features)
                            results, reports = self._solve(block_idx, block, part_of_g, H, n, samples[g.name],
                                                           seconds, routed.get(g.name), cfg, rows)
                            mine.update(results)
                            if split:
                                slice_reports.update((x.name, x) for x in reports)
                            else:
                                layers.extend(reports)
            with self._timed("share", seconds):
                for g in stage:
                    for lin in g.linears:
                        cfg = self._layer_config(block_idx, lin)
                        if cfg is None:
                            continue  # skipped by quant.overrides: the part keeps its `.weight`
                        linear = block.get_submodule(lin)
                        if split:
                            packed[lin] = self._share_rows(linear, mine.get(lin), cfg)
                        else:
                            packed[lin] = self._share(linear, mine.get(lin), owners[g.name], cfg)
                        _install(linear, packed[lin], cfg.bits, self.dtype)
                if split:
                    layers.extend(self._merge_reports(block_idx, block, stage, slice_reports, reduced, routed))
        log.debug("stages_on_recorded_inputs", rank=self.rank,
                  stages={stages[i][0].name: stage_inputs.holders[i] for i in stage_inputs.replayed})
        part = {}
        for name, tensor in source.items():
            rel = name[len(prefix):]
            lin = rel.removesuffix(".weight")
            if rel.endswith(".weight") and lin in packed:
                for f in PACKED_FIELDS:
                    part[f"{prefix}{lin}.{f}"] = getattr(packed[lin], f)
            else:
                part[name] = tensor
        return part, layers  # on the worker's device

    def _collect(self, block: nn.Module, stage: list[InputGroup], seconds: dict[str, float],
                 stage_inputs: StageInputs, stage_idx: int):
        """Forward the shard through the block, summing xᵀx at each input group's first linear.

        The forward stops at the stage's last input group: what follows it is not needed yet. Where the
        stage lies inside the child whose calls an earlier stage recorded, only that child runs.
        """
        with self._timed("collect", seconds):
            sums = {g.name: torch.zeros(g.in_features, g.in_features, dtype=self.hessian_dtype, device=self.device)
                    for g in stage}
            tokens = {g.name: 0 for g in stage}
            samples: dict[str, torch.Tensor] = {}
            hooks = []
            for g in stage:
                def record(_mod, args, g=g):
                    x = args[0]
                    tokens[g.name] += accumulate_hessian(sums[g.name], x, mirror=False)  # mirrored once below
                    if g.name not in samples:
                        samples[g.name] = x.reshape(-1, x.shape[-1])[: self.setup.validate_tokens].clone()
                    if g is stage[-1]:
                        raise _StageCollected
                hooks.append(block.get_submodule(g.linears[0]).register_forward_pre_hook(record))
            replay = stage_inputs.recorded(stage_idx, len(self.inputs))
            if replay is None:
                hooks += stage_inputs.record(stage_idx)  # for the next stage, if it lies in the same child
            try:
                if replay is not None:
                    child, calls = replay
                    for call in calls:
                        try:
                            child(*call.args, **call.kwargs)
                        except _StageCollected:
                            pass
                else:
                    for inp in self.inputs:
                        try:
                            forward_block(block, inp)
                        except _StageCollected:
                            pass
            finally:
                for h in hooks:
                    h.remove()
            stage_inputs.done(stage_idx)
            for hessian_sum in sums.values():
                mirror_upper(hessian_sum)
        return sums, tokens, samples

    def _reduce(self, hessian_sum: torch.Tensor, n_tokens: int, owner: int) -> tuple[torch.Tensor, int] | None:
        """Gather every rank's partial sum on the owner and add them in rank order (deterministic), a row
        chunk at a time (workers/collectives.py)."""
        counts = torch.tensor([n_tokens], dtype=torch.int64, device=self.device)
        if self.world == 1:
            return hessian_sum, n_tokens
        is_owner = self.rank == owner
        all_counts = [torch.empty_like(counts) for _ in range(self.world)] if is_owner else None
        total = gather_sum(hessian_sum, owner, self.rank, self.world)  # in row chunks: bounded memory
        dist.gather(counts, all_counts, dst=owner)
        if not is_owner:
            return None
        self._count("reduce", (self.world - 1) * (_nbytes(hessian_sum) + _nbytes(counts)))
        return total, int(sum(int(c.item()) for c in all_counts))

    def _solve(self, block_idx: int, block: nn.Module, group: InputGroup, H: torch.Tensor, n_tokens: int,
               x_val: torch.Tensor, seconds: dict[str, float],
               routed_tokens: int | None = None,
               cfg: GPTQConfig | None = None,
               rows: dict[str, tuple[int, int]] | None = None) -> tuple[dict[str, PackedLinear], list[LayerReport]]:
        """GPTQ on the group's linears, which must all take `cfg` (default: the job's base config); with
        `rows`, on each linear's output rows [start, stop) only (its packed slice and the slice's report)."""
        cfg = cfg or self.setup.gptq
        starved_policy = self._starved_policy(routed_tokens)
        prefix = self.layout.block_prefix(block_idx)
        weights = [block.get_submodule(lin).weight for lin in group.linears]
        if rows is not None:
            weights = [w[rows[lin][0]:rows[lin][1]] for lin, w in zip(group.linears, weights)]
        weights = [w.float() for w in weights]  # [N_i, K]
        self.rows_solved += sum(w.shape[0] for w in weights)
        with self._timed("solve", seconds):
            try:
                results = solve_input_group(weights, H, n_tokens, cfg)
            except HessianNotPositiveDefinite as err:
                raise HessianNotPositiveDefinite(f"block {block_idx} input group {group.name}: {err}") from err
        with self._timed("baseline", seconds):
            rtn = [quantize_rtn(w, H, n_tokens, cfg) for w in weights]  # the report's baseline loss
        if starved_policy == "rtn":
            results = rtn  # a starved expert gets RTN's codes; both losses still use the all-token H
        with self._timed("validate", seconds):
            packed, reports = {}, []
            for lin, w, res, base in zip(group.linears, weights, results, rtn):
                p = self._pack(res, cfg.bits)
                expected = dequantize(res.codes, res.scales, res.zeros, res.g_idx)
                try:
                    check = validate_packed_layer(x_val, p, cfg.bits, expected, self.setup.validate_tolerance,
                                                  gemm=dequant_gemm)  # Triton on GPU, reference on CPU
                except KernelMismatch as err:
                    raise KernelMismatch(f"block {block_idx} layer {prefix}{lin}: {err}") from err
                packed[lin] = p
                reports.append(LayerReport(
                    name=prefix + lin, input_group=group.name, in_features=w.shape[1], out_features=w.shape[0],
                    gptq_loss=res.loss, rtn_loss=base.loss, damp_percent=res.damp_percent, n_tokens=n_tokens,
                    owner=self.rank, max_rel_err=check.max_rel_err, mean_rel_err=check.mean_rel_err,
                    routed_tokens=routed_tokens, starved_policy=starved_policy,
                ))
                log.debug("layer_solved", rank=self.rank, layer=prefix + lin, loss=res.loss, rtn_loss=base.loss,
                          damp_percent=res.damp_percent)
        return packed, reports

    def _starved_policy(self, routed_tokens: int | None) -> str | None:
        """quant.moe.starved_experts for an expert routed fewer than min_tokens; None otherwise."""
        starved = routed_tokens is not None and routed_tokens < self.setup.moe.min_tokens
        return self.setup.moe.starved_experts if starved else None

    def _splits_rows(self, stage: list[InputGroup], aliases: dict[str, str]) -> bool:
        """Whether every rank solves a slice of every group of this stage: fewer groups than ranks (one per
        true_sequential stage of a dense model). MoE stages whose experts share a Hessian keep owners."""
        return self.setup.split_rows and self.world > 1 and len(stage) < self.world and not aliases

    def _my_rows(self, block: nn.Module, linears: tuple[str, ...]) -> dict[str, tuple[int, int]]:
        """This rank's output rows [start, stop) of each linear (possibly empty)."""
        out = {}
        for lin in linears:
            bounds = row_bounds(block.get_submodule(lin).out_features, self.world)
            out[lin] = (bounds[self.rank], bounds[self.rank + 1])
        return out

    def _reduce_to_all(self, hessian_sum: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, int]:
        """The rank-ordered sum of every rank's partial sum on every rank, in place (the bits _reduce gives
        an owner), and the total token count."""
        received = sum_to_all_(hessian_sum, self.rank, self.world)
        counts = torch.tensor([n_tokens], dtype=torch.int64, device=self.device)
        dist.all_reduce(counts)  # integers: exact in any order
        self._count("reduce", received + (self.world - 1) * _nbytes(counts))
        return hessian_sum, int(counts.item())

    def _share_rows(self, linear: nn.Linear, mine: PackedLinear | None, cfg: GPTQConfig) -> PackedLinear:
        """Every rank's packed row slice of one linear, broadcast in rank order and concatenated along the
        output dim: the layer as one rank would have packed all its rows. g_idx comes from the first slice."""
        bounds = row_bounds(linear.out_features, self.world)
        slices: list[PackedLinear] = []
        for r in range(self.world):
            n_rows = bounds[r + 1] - bounds[r]
            if n_rows == 0:
                continue
            src = mine if r == self.rank else _empty_packed(n_rows, linear.in_features, cfg)
            fields = {f: self._broadcast(getattr(src, f), src=r, stage="share") for f in OUTPUT_DIM}
            g_idx = self._broadcast(src.g_idx, src=r, stage="share") if not slices else slices[0].g_idx
            slices.append(PackedLinear(g_idx=g_idx, **fields))
        return concat_packed(slices)

    def _merge_reports(self, block_idx: int, block: nn.Module, stage: list[InputGroup],
                       slice_reports: dict[str, LayerReport], reduced: dict[str, tuple[torch.Tensor, int]],
                       routed: dict[str, int]) -> list[LayerReport]:
        """One report per row-split linear (rank 0's; the values are the same on every rank): losses
        summed over the slices in rank order, the largest kernel error, the row-weighted mean error."""
        prefix = self.layout.block_prefix(block_idx)
        split = [(g, lin) for g in stage for linears, _ in self._configs_of(block_idx, g) for lin in linears]
        # per linear, _SLICE_FIELDS of this rank's slice (out_features = its rows; 0: no slice here)
        mine = torch.zeros(len(split), len(_SLICE_FIELDS), dtype=torch.float64, device=self.device)
        for i, (_, lin) in enumerate(split):
            x = slice_reports.get(prefix + lin)
            if x is not None:
                mine[i] = torch.tensor([getattr(x, f) for f in _SLICE_FIELDS], dtype=torch.float64)
        parts = [torch.empty_like(mine) for _ in range(self.world)]
        dist.all_gather(parts, mine)
        self._count("share", (self.world - 1) * _nbytes(mine))
        if self.rank != 0:
            return []
        reports = []
        for i, (g, lin) in enumerate(split):
            slices = [dict(zip(_SLICE_FIELDS, p[i].tolist(), strict=True)) for p in parts]  # rank order
            solved = [v for v in slices if v["out_features"] > 0]
            rows = [v["out_features"] for v in solved]
            linear = block.get_submodule(lin)
            reports.append(LayerReport(
                name=prefix + lin, input_group=g.name, in_features=linear.in_features,
                out_features=linear.out_features, gptq_loss=sum(v["gptq_loss"] for v in solved),
                rtn_loss=sum(v["rtn_loss"] for v in solved), damp_percent=solved[0]["damp_percent"],
                n_tokens=reduced[g.name][1], owner=-1, max_rel_err=max(v["max_rel_err"] for v in solved),
                mean_rel_err=sum(v["mean_rel_err"] * r for v, r in zip(solved, rows, strict=True)) / sum(rows),
                routed_tokens=routed.get(g.name), starved_policy=self._starved_policy(routed.get(g.name)),
            ))
        return reports

    def _share_hessian(self, reduced: tuple[torch.Tensor, int] | None, owner: int,
                       template: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The owner's reduced Hessian sum and token count on every rank, for input groups that share it."""
        H, n = reduced if reduced is not None else (torch.empty_like(template), 0)
        count = self._broadcast(torch.tensor([n], dtype=torch.int64, device=self.device), src=owner, stage="reduce")
        return self._broadcast(H, src=owner, stage="reduce"), int(count.item())

    def _routed_tokens(self, block_idx: int, block: nn.Module, stage: list[InputGroup]) -> dict[str, int]:
        """Calibration tokens the router sent to each expert input group of the stage, summed over ranks.

        Raises:
            StarvedExpert: an expert is below quant.moe.min_tokens and the policy is error (every rank alike).
        """
        experts = [g for g in stage if expert_of(block, g) is not None]
        if not experts:
            return {}
        counts = torch.tensor([local_routed_tokens(block, g) for g in experts], dtype=torch.int64, device=self.device)
        if self.world > 1:
            dist.all_reduce(counts)
        routed = {g.name: int(c) for g, c in zip(experts, counts.tolist())}
        cfg = self.setup.moe
        starved = {name: n for name, n in routed.items() if n < cfg.min_tokens}
        if starved:
            log.warning("experts_starved", experts=starved, min_tokens=cfg.min_tokens, policy=cfg.starved_experts)
        if starved and cfg.starved_experts == "error":
            raise StarvedExpert(
                f"block {block_idx}: the router sent fewer than quant.moe.min_tokens={cfg.min_tokens} calibration "
                f"tokens to {starved}; set quant.moe.starved_experts to calibrate_all or rtn, or raise "
                "calibration.n_samples")
        return routed

    def _pack(self, result: GPTQResult, bits: int) -> PackedLinear:
        return pack_linear(result, bits)

    def _layer_config(self, block_idx: int, linear: str) -> GPTQConfig | None:
        """The linear's GPTQConfig after quant.overrides; None when it stays unquantized."""
        return layer_config(self.layout.block_prefix(block_idx) + linear, self.setup.gptq, self.setup.overrides)

    def _configs_of(self, block_idx: int, group: InputGroup) -> list[tuple[tuple[str, ...], GPTQConfig]]:
        """The group's quantized linears by config, in forward order: linears stacked into one solve share
        a config, and all share the group's Hessian; skipped linears are left out."""
        by_config: dict[GPTQConfig, list[str]] = {}
        for lin in group.linears:
            cfg = self._layer_config(block_idx, lin)
            if cfg is not None:
                by_config.setdefault(cfg, []).append(lin)
        return [(tuple(linears), cfg) for cfg, linears in by_config.items()]

    def _share(self, linear: nn.Linear, mine: PackedLinear | None, owner: int, cfg: GPTQConfig) -> PackedLinear:
        """Broadcast one linear's packed tensors from its owner; shapes follow from the layer and its config."""
        if mine is None:
            mine = _empty_packed(linear.out_features, linear.in_features, cfg)
        return PackedLinear(**{f: self._broadcast(getattr(mine, f), src=owner, stage="share") for f in PACKED_FIELDS})

    def _advance(self, block_idx: int, part: dict[str, torch.Tensor]) -> nn.Module:
        """Forward the shard through the quantized block, built from its packed tensors as a reader would."""
        prefix = self.layout.block_prefix(block_idx)
        part = {k: v.to(self.device) for k, v in part.items()}  # unpack on the GPU, not the host
        state = {}
        for name, tensor in part.items():
            rel = name[len(prefix):]
            stem, _, suffix = rel.rpartition(".")
            if suffix in PACKED_FIELDS:
                if suffix == "qweight":
                    p = PackedLinear(**{f: part[f"{prefix}{stem}.{f}"] for f in PACKED_FIELDS})
                    state[f"{stem}.weight"] = dequantize_packed(p, packed_bits(p))  # overrides may differ per layer
            else:
                state[rel] = tensor
        block = materialize(self.blocks[block_idx], state, self.dtype)
        self.inputs = [inp.advanced(forward_block(block, inp)) for inp in self.inputs]
        return block

    # ---- in-pass evaluation -----------------------------------------------------------------------

    @property
    def _eval_on(self) -> bool:
        return self.setup.eval_on

    def _start_eval(self, eval_samples: torch.Tensor | None) -> None:
        """Capture the held-out windows' block-0 inputs; every stream starts from the same ones."""
        if not self._eval_on:
            return
        if eval_samples is None:
            raise ValueError("setup.eval_on is set: start() needs this rank's eval_samples (may be empty)")
        self.eval_ids = list(eval_samples.split(self.setup.micro_batch))
        first = [capture_block_inputs(self.model, self.layout, ids.to(self.device)) for ids in self.eval_ids]
        names = ("fp", "gptq", "rtn") if self.setup.eval_rtn else ("fp", "gptq")
        self.eval_streams = {name: list(first) for name in names}

    def _advance_eval(self, block_idx: int, quantized: nn.Module, part: dict[str, torch.Tensor],
                      source: dict[str, torch.Tensor]) -> None:
        """Move each eval stream through its own version of the block: fp, quantized, (RTN)."""
        prefix = self.layout.block_prefix(block_idx)
        fp_state = {n[len(prefix):]: t for n, t in source.items()}
        blocks = {"gptq": quantized, "fp": materialize(self.blocks[block_idx], fp_state, self.dtype)}
        if "rtn" in self.eval_streams:
            rtn_state = dict(fp_state)
            for name in part:
                if name.endswith(".qweight"):
                    linear = name[len(prefix):].removesuffix(".qweight")
                    cfg = self._layer_config(block_idx, linear)  # the same bits / groups as its GPTQ codes
                    rtn_state[f"{linear}.weight"] = rtn_weight(fp_state[f"{linear}.weight"].to(self.device), cfg)
            blocks["rtn"] = materialize(self.blocks[block_idx], rtn_state, self.dtype)
        for name, stream in self.eval_streams.items():
            self.eval_streams[name] = [inp.advanced(forward_block(blocks[name], inp)) for inp in stream]

    def _load_head(self) -> None:
        names = [n for n in self.layout.head_names if n in self.source.tensors]
        materialize_embedding_stage(self.model, {n: read_source_tensor(self.source, n, self.device) for n in names},
                                    self.dtype)
        tie_output_head(self.model)

    @torch.no_grad()
    def evaluate(self) -> dict[str, tuple[float, int]]:
        """Per stream: summed next-token NLL and predicted tokens over every rank's eval windows.

        Call after the last block: the model's own final norm and head turn each stream into logits.
        """
        self._bind(block=None)
        totals: dict[str, tuple[float, int]] = {}
        with self._peers_agree():
            if self._eval_on:
                self._load_head()
            for name, stream in self.eval_streams.items():
                nll, count = 0.0, 0
                for ids, inp in zip(self.eval_ids, stream):
                    for i in range(len(ids)):  # one window at a time: [T, vocab] logits stay small
                        window = ids[i:i + 1].to(self.device)
                        logits = final_logits(self.model, self.layout, inp.hidden[i:i + 1], window)
                        part_nll, part_count = window_nll(logits, window)
                        nll, count = nll + part_nll, count + part_count
                totals[name] = (nll, count)
        out = {}
        for name in sorted(totals):
            # every rank's totals, added in rank order: the same float result on every rank
            parts = [torch.tensor(totals[name], dtype=torch.float64, device=self.device)]
            if self.world > 1:
                mine, parts = parts[0], [torch.empty_like(parts[0]) for _ in range(self.world)]
                dist.all_gather(parts, mine)
            out[name] = (sum(float(p[0]) for p in parts), sum(int(p[1]) for p in parts))
        return out

    # ---- collectives ------------------------------------------------------------------------------

    def _broadcast(self, tensor: torch.Tensor, src: int, stage: str) -> torch.Tensor:
        """Broadcast any dtype as raw bytes (Gloo lacks some dtypes)."""
        if self.world == 1:
            return tensor
        if self.rank != src:
            self._count(stage, _nbytes(tensor))
        t = tensor.contiguous().to(self.device)
        raw = t.reshape(-1).view(torch.uint8)
        dist.broadcast(raw, src=src)
        return raw.view(t.dtype).reshape(t.shape)

    @contextmanager
    def _peers_agree(self) -> Iterator[None]:
        """Run the body, then let every rank learn whether any rank's body failed: a failing rank raises
        its own error, the others PeerFailed, and none waits forever in the next collective."""
        err = None
        try:
            yield
        except Exception as e:  # noqa: BLE001 - re-raised by _agree once the peers know
            err = e
        self._agree(err)

    def _agree(self, err: BaseException | None) -> None:
        """Every rank learns whether any rank failed, so none waits forever in the next collective."""
        flag = torch.tensor([0 if err is None else 1], dtype=torch.int32, device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if err is not None:
            raise err
        if flag.item():
            raise PeerFailed(f"rank {self.rank}: another worker failed in this stage; see its error")

    def _count(self, stage: str, nbytes: int) -> None:
        self.received[stage] = self.received.get(stage, 0) + nbytes

    @contextmanager
    def _timed(self, stage: str, seconds: dict[str, float]) -> Iterator[None]:
        """Charge the body's time to `seconds[stage]` (added up over sub-stages); the progress bar shows it."""
        self.stage = (self.stage[0], stage)
        t = self._now()
        yield
        seconds[stage] = seconds.get(stage, 0.0) + self._now() - t

    def _now(self) -> float:
        """A stage clock: waits for queued GPU work so each stage is charged its own time."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _bind(self, block: int | None) -> None:
        structlog.contextvars.bind_contextvars(job_id=self.setup.job_id, block=block, rank=self.rank)


class _HostCopy:
    """Tensors copied to host memory on a side CUDA stream (pinned, asynchronous); a plain dict on CPU."""

    def __init__(self, tensors: dict[str, torch.Tensor], device: torch.device):
        if device.type != "cuda":
            self.tensors, self.stream = {k: v.cpu() for k, v in tensors.items()}, None
            return
        self.stream = torch.cuda.Stream(device)
        self.stream.wait_stream(torch.cuda.current_stream(device))  # the tensors are final
        with torch.cuda.stream(self.stream):
            self.tensors = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True).copy_(v, non_blocking=True)
                            for k, v in tensors.items()}
        for v in tensors.values():
            v.record_stream(self.stream)  # not reused by the allocator before the copy is done

    def result(self) -> dict[str, torch.Tensor]:
        if self.stream is not None:
            self.stream.synchronize()
        return self.tensors


# the LayerReport fields of a row slice that _merge_reports gathers from every rank
_SLICE_FIELDS = ("gptq_loss", "rtn_loss", "damp_percent", "max_rel_err", "mean_rel_err", "out_features")


def _balance(sizes: dict[str, int], world: int) -> dict[str, int]:
    """Assign items to ranks, largest first to the least-loaded (ties: lowest rank). Deterministic."""
    load = [0] * world
    out = {}
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        r = min(range(world), key=lambda i: (load[i], i))
        out[name] = r
        load[r] += sizes[name]
    return out


def _structure(block: nn.Module) -> tuple:
    """What decides a block's input groups: its modules' names and classes and its parameters' shapes."""
    return (tuple((name, type(mod).__name__) for name, mod in block.named_modules()),
            tuple((name, tuple(p.shape)) for name, p in block.named_parameters()))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _empty_packed(out_features: int, in_features: int, cfg: GPTQConfig) -> PackedLinear:
    shapes = packed_shapes(out_features, in_features, cfg.bits, cfg.group_size)
    return PackedLinear(**{f: torch.empty(shape, dtype=dtype) for f, (shape, dtype) in shapes.items()})


def _install(linear: nn.Linear, packed: PackedLinear, bits: int, dtype: torch.dtype) -> None:
    """Replace a linear's weight by its dequantized codes, exactly as a checkpoint reader sees them."""
    w = dequantize_packed(packed, bits).to(device=linear.weight.device, dtype=dtype)
    linear.weight = nn.Parameter(w, requires_grad=False)

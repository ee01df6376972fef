"""The block worker: keeps one calibration shard for the whole job and runs block stages.

A plain class: `jobs` makes it a Ray actor in one place; GPU benchmarks build it in-process, one
process per GPU. All W workers form one torch.distributed group (Gloo on CPU, NCCL on GPU) and call
the same collectives in the same order, so each method must be entered by every rank.

Per block (DESIGN.md §5): load (workers/block_load.py) → plan (workers/block_plan.py) → per true_sequential
stage: collect (workers/stage_collect.py) → reduce → solve (baseline, validate) → share → install, the stage's
owner or row-split choice made once (workers/stage_strategy.py) → advance the shard through the *quantized*
block → move the eval streams (workers/in_pass_eval.py). Collectives and error agreement: workers/rank_group.py;
per-stage seconds: workers/stage_timing.py.
"""

from __future__ import annotations

import contextlib
import resource
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta

import structlog
import torch
import torch.distributed as dist
from torch import nn

from rayquant.solver.gptq import GPTQConfig, GPTQResult
from rayquant.solver.pack import PackedLinear, pack_linears
from rayquant.storage.job_records import LayerReport
from rayquant.storage.model_source import (ModelSource, check_config_matches_weights, open_model_source,
                                           read_source_tensor)
from rayquant.storage.shard_plan import ShardPlan
from rayquant.workers.adapter import (
    BlockInput,
    InputGroup,
    build_skeleton,
    capture_block_inputs,
    embedding_stage_names,
    find_layout,
    forward_block,
    materialize,
    materialize_embedding_stage,
    move_buffers,
)
from rayquant.workers.block_load import broadcast_block, read_share, share_bytes
from rayquant.workers.block_plan import BlockPlan, BlockPlanner, PlanOptions
from rayquant.workers import failpoints
from rayquant.workers.block_writer import BlockWriter, OutputTarget, read_durable_block
from rayquant.workers.child_memo import ChildMemo, GpuRoom, memo_micro_batch, memo_pass, memo_placement
from rayquant.workers.collectives import free_tcp_address, join_process_group
from rayquant.workers.cuda_allocator import configure_cuda_allocator
from rayquant.workers.host_copy import HostCopy
from rayquant.workers.host_memory import available_host_memory
from rayquant.workers.in_pass_eval import EvalStreams
from rayquant.workers.out_of_memory import names_out_of_memory
from rayquant.workers import kernel_warmup
from rayquant.workers.kernel_warmup import finish_warm_up, header_shapes, job_shapes, start_warm_up
from rayquant.workers.layer_overrides import LayerOverride, layer_config
from rayquant.workers.moe import (
    MoEConfig,
    expert_of,
    routed_experts,
    reset_routed_tokens,
    set_calibration,
    shared_hessians,
    unfuse_experts,
)
from rayquant.workers.output_plan import plan_output
from rayquant.workers.packed_block import (dequantized_state, install, packed_linears, packed_part,
                                          release_source_weights)
from rayquant.workers.prefetch import Prefetch
from rayquant.workers.prefetch_placement import prefetch_placement
# PeerFailed is raised by agree_on_errors; the driver imports it from here
from rayquant.workers.rank_group import PeerFailed as PeerFailed
from rayquant.workers.rank_group import RankGroup, agree_on_errors
from rayquant.workers.routing_memo import routing_memo
from rayquant.workers.stage_collect import CollectedStage, collect_stage
from rayquant.workers.stage_inputs import StageInputs
from rayquant.workers.stage_solve import GroupWork, SolveSettings, solve_groups
from rayquant.workers.stage_strategy import OwnerStage, Reduced, RowSplitStage, stage_strategy
from rayquant.workers.stage_timing import StageClock
from rayquant.workers.starved_experts import recollect_starved, routed_tokens, validation_samples
from rayquant.workers.unread_experts import skipped

log = structlog.get_logger()


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
    gpu_activations: str = "bfloat16"  # quant.gpu_activations: the activations' dtype on a CUDA device
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
    # a remote source (s3://, hf://) as the driver opened it: tensors are read at the revision it pinned,
    # never re-listed (model_path is then only where its small files are cached on the driver)
    source: ModelSource | None = None
    rendezvous_timeout_s: float = 60.0  # cluster.rendezvous_timeout_s: every rank joined, or a named error
    collective_timeout_s: float = 1800.0  # cluster.collective_timeout_s: one collective's longest wait


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
    # later forwards of a child (attention, the MLP) compute only its last linear, from the input its stage
    # kept (workers/child_memo.py); False: every forward computes the whole child
    child_memo = True
    # a stage whose input does not read a routed-experts module's output (DeepSeek's shared expert, after the
    # routed experts) collects with that module returning zeros (workers/unread_experts.py); False: it computes
    skip_unread_experts = True
    # the quantize passes compute each MoE router's output and dispatch once per micro-batch
    # (workers/routing_memo.py); False: every pass routes again
    memo_routing = True

    def __init__(self, setup: WorkerSetup):
        self.setup = setup
        self.rank, self.world = setup.rank, setup.world_size
        self.device = torch.device(setup.device)
        if self.device.type == "cuda":
            configure_cuda_allocator()  # before the first CUDA allocation: join's warm-up
        self.dtype = torch.float32 if self.device.type == "cpu" else getattr(torch, setup.gpu_activations)
        # On CPU the Hessian sums are float64: rounding them to fp32 once, after the reduce, makes
        # them (almost always bit-)identical whatever the worker count. On GPU, fp32 for speed.
        self.hessian_dtype = torch.float64 if self.device.type == "cpu" else torch.float32
        self.source: ModelSource | None = None
        self.group: RankGroup | None = None  # set by join()
        self.inputs: list[BlockInput] = []
        self.eval: EvalStreams | None = None  # in-pass evaluation (setup.eval_on), set by embed()
        self.clock = StageClock(self.device, self.rank)  # this block's seconds per stage; the stage now running
        self.rows_solved = 0  # output rows solved on this rank, for the current block
        self._planner = BlockPlanner(self.rank)  # remembers each block structure's groups (workers/block_plan.py)
        # per block structure, a block's peak GPU memory with its child memo in host memory, and the memo's bytes
        self._peak_with_memo_on_host: dict[tuple, tuple[int, int]] = {}
        self._memo: ChildMemo | None = None  # the block being quantized
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

    @names_out_of_memory("start-up (join)")
    def join(self, rendezvous: str) -> int:
        """Everything before the calibration windows: the process group, the model's skeleton, the
        embedding stage's weights on the device. Returns the block count.

        The job calls it as soon as the actor exists, so it runs while the driver cuts the windows."""
        self._bind(block=None)
        failpoints.reach(self.rank, None, "join")
        torch.set_num_threads(self.setup.num_threads)  # a reused Ray worker may keep 1
        torch.manual_seed(0)
        if self.device.type == "cuda":
            if self.device.index is None:
                self.device = torch.device("cuda", torch.cuda.current_device())
            torch.cuda.set_device(self.device)  # NCCL binds each rank to its current device
        backend = "nccl" if self.device.type == "cuda" else "gloo"

        t = time.perf_counter()
        # every socket on the rendezvous host only; a rank that never comes is named within the timeout
        join_process_group(backend, rendezvous, self.rank, self.world,
                           timedelta(seconds=self.setup.rendezvous_timeout_s),
                           timedelta(seconds=self.setup.collective_timeout_s))
        self.group = RankGroup(self.rank, self.world, self.device)
        t_group = time.perf_counter()
        with agree_on_errors(self.group):
            self.source = self.setup.source or open_model_source(self.setup.model_path)
            warms = self.device.type in kernel_warmup.WARMUP_DEVICES
            if warms:  # kernels compile from the headers' shapes while the skeleton builds
                warm = header_shapes(self.source.tensors, self.setup.gptq, self.setup.overrides)
                self._warm_up = start_warm_up(warm, self.device, self.dtype, self.hessian_dtype,
                                              self.setup.validate_tokens)
            self.model = build_skeleton(self.source.config, self.dtype)
            unfuse_experts(self.model)  # MoE: one linear per expert, under the checkpoint's names
            self.layout = find_layout(self.model)
            self.blocks = self.model.get_submodule(self.layout.blocks_path)
            t_skeleton = time.perf_counter()
            head = set(self.layout.head_names)  # never read by a worker
            # a config.json that disagrees with the weights fails here, not when a block loads
            check_config_matches_weights(self.source, {n: tuple(t.shape) for n, t in self.model.state_dict().items()
                                                       if n not in head}, self.layout.blocks_path)
            names = embedding_stage_names(self.model, self.layout)
            tensors = {n: read_source_tensor(self.source, n, self.device) for n in names if n in self.source.tensors}
            materialize_embedding_stage(self.model, tensors, self.dtype)
            move_buffers(self.model, self.device)
        if warms:
            missed = set(job_shapes(self.blocks, self.layout, self.setup.gptq, self.setup.overrides)) - set(warm)
            if missed:  # block 0 compiles them itself
                log.info("kernel_warmup_missed_shapes", shapes=sorted((m.out_features, m.in_features) for m in missed))
        log.info("worker_joined", rank=self.rank, blocks=self.layout.n_blocks, group_s=round(t_group - t, 2),
                 skeleton_s=round(t_skeleton - t_group, 2), embedding_s=round(time.perf_counter() - t_skeleton, 2))
        return self.layout.n_blocks

    @names_out_of_memory("start-up (embedding the calibration windows)")
    def embed(self, samples: torch.Tensor, eval_samples: torch.Tensor | None = None) -> None:
        """Embed this rank's calibration shard `samples` [n_w, T] and its held-out windows `eval_samples`
        [e_w, T] (if setup.eval_on): the block-0 inputs every later block advances."""
        self._bind(block=None)
        failpoints.reach(self.rank, None, "embed")
        with agree_on_errors(self.group):
            for ids in samples.split(self.setup.micro_batch):
                self.inputs.append(capture_block_inputs(self.model, self.layout, ids.to(self.device)))
            if self.setup.eval_on:
                if eval_samples is None:
                    raise ValueError("setup.eval_on is set: start() needs this rank's eval_samples (may be empty)")
                self.eval = EvalStreams(self.model, self.layout, self.group, self.dtype,
                                        list(eval_samples.split(self.setup.micro_batch)), self.setup.eval_rtn,
                                        self.setup.gptq, self.setup.overrides)
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
        return self.clock.now

    # ---- one block ----------------------------------------------------------------------------

    @names_out_of_memory()
    @torch.no_grad()
    def run_block(self, task: BlockTask) -> BlockResult:
        """Quantize block `task.block_idx` (or replay it from its shard) and advance the calibration shard.

        Rank 0 queues the quantized block for its background writer (set_output) and returns without
        waiting for the disk; `wait_durable` says when the bytes are on disk."""
        self._bind(block=task.block_idx)
        self.clock.start_block(task.block_idx)
        self.group.received, self.rows_solved = {}, 0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        source_tensors = None
        if not task.replay or self.eval is not None:  # a replayed block still moves the fp eval stream
            with self.clock.timed("load"):
                source_tensors = self._load(task.block_idx)
            if task.block_idx + 1 < self.layout.n_blocks:
                self._start_prefetch(task.block_idx + 1)
        if task.replay:
            part, layers, built = read_durable_block(self.output, task.block_idx), [], None
            self._advance_reference_eval(task.block_idx, source_tensors,
                                         packed_linears(part, self.layout.block_prefix(task.block_idx)))
        else:  # moves the reference eval streams first: its stages free the source weights
            part, layers, built = self._quantize(task.block_idx, source_tensors)
            self._prefetch.copy_up()  # a pinned next share goes up while this block advances
        # rank 0 copies the block to host memory for the writer; the copy overlaps the advance
        with self.clock.timed("handoff"):
            to_host = HostCopy(part, self.device) if self.rank == 0 and not task.replay else None
        with self.clock.timed("advance"):
            quantized = self._advance(task.block_idx, part, built)
        memo, self._memo = self._memo, None
        if self.eval is not None:
            with self.clock.timed("eval"):
                self.eval.advance_quantized(quantized)
        peak = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # process peak RSS (KiB on Linux)
        if memo is not None and memo.on_host and memo.nbytes:
            self._peak_with_memo_on_host[memo.signature] = (peak, memo.nbytes)
        if memo is not None:
            log.debug("child_memo", rank=self.rank, children=memo.used(), shortcuts=memo.shortcuts(),
                      dropped=memo.dropped(), on_host=memo.on_host, gib=round(memo.nbytes / 2**30, 3))
            memo.release()
        log.info("block_stages_done", rank=self.rank, replay=task.replay,
                 **{k: round(v, 3) for k, v in self.clock.seconds.items()})
        with self.clock.timed("handoff"):  # waits only while the writer has a block queued already
            host_part = self._hand_off(task.block_idx, to_host)
        return BlockResult(block_idx=task.block_idx, rank=self.rank, seconds=self.clock.seconds, layers=layers,
                           tensors=host_part, peak_memory_bytes=peak,
                           bytes_received=dict(self.group.received), rows_solved=self.rows_solved)

    def wait_durable(self, block_idx: int) -> float:
        """Seconds rank 0's writer took for block block_idx, once its bytes are fsynced (0 elsewhere).

        Called from a second actor thread while the next block runs.

        Raises:
            the write's error (a full disk, a removed output directory).
        """
        return self.writer.wait_durable(block_idx) if self.writer is not None else 0.0

    @names_out_of_memory("the in-pass evaluation")
    @torch.no_grad()
    def evaluate(self) -> dict[str, tuple[float, int]]:
        """Per stream: summed next-token NLL and predicted tokens over every rank's eval windows ({} without
        setup.eval_on). Call after the last block (workers/in_pass_eval.py)."""
        self._bind(block=None)
        failpoints.reach(self.rank, None, "evaluate")
        return self.eval.evaluate(self.source) if self.eval is not None else {}

    # ---- the block's steps ------------------------------------------------------------------------

    def _load(self, block_idx: int) -> dict[str, torch.Tensor]:
        """The block's source tensors on every rank: this rank's 1/W, usually prefetched while the previous
        block computed, and the others' broadcast (workers/block_load.py)."""
        with agree_on_errors(self.group):
            mine = self._prefetch.take(block_idx) or self._read_share(block_idx)
        return broadcast_block(self.group, self.source, self.layout.block_prefix(block_idx), mine)

    def _read_share(self, block_idx: int, pinned: bool = False) -> dict[str, torch.Tensor]:
        return read_share(self.group, self.source, self.layout.block_prefix(block_idx), pinned)

    def _start_prefetch(self, block_idx: int) -> None:
        """Read this rank's share of block_idx in the background: onto the GPU, or into pinned host memory where
        it would crowd the block computing now (workers/prefetch_placement.py), or not at all."""
        nbytes = share_bytes(self.group, self.source, self.layout.block_prefix(block_idx))
        gpu = torch.cuda.get_device_properties(self.device).total_memory if self.device.type == "cuda" else None
        where = prefetch_placement(nbytes, gpu, available_host_memory())
        log.debug("prefetch", rank=self.rank, next_block=block_idx, where=where, gib=round(nbytes / 2**30, 3))
        if where is not None:
            self._prefetch.start(block_idx, lambda b: self._read_share(b, pinned=where == "host"), self.device)

    def _quantize(self, block_idx: int, source: dict[str, torch.Tensor]) -> tuple[
            dict[str, torch.Tensor], list[LayerReport], nn.Module]:
        """Plan, then per true_sequential stage: collect → reduce → solve (baseline, validate) → share →
        install. Returns the block's tensors under checkpoint names (on the device), its layer reports, and
        the block itself with every quantized linear installed (what a reader rebuilds from the tensors)."""
        with self.clock.timed("plan"):
            plan = self._plan(block_idx, source)
        block, packed, layers = plan.block, {}, []
        prefix = self.layout.block_prefix(block_idx)
        self._advance_reference_eval(block_idx, source, {lin for stage in plan.stages for g in stage
                                                          for linears, _ in self._configs_of(block_idx, g)
                                                          for lin in linears})
        # the stages' passes rerun the MoE child on the same inputs: its routing is computed once per micro-batch
        with routing_memo(block) if self.memo_routing else contextlib.nullcontext():
            for i, stage in enumerate(plan.stages):
                installed, reports = self._stage(block_idx, plan, i, stage)
                release_source_weights(source, prefix, installed)  # the block holds their quantized copies
                packed |= installed
                layers += reports
        log.debug("stages_on_recorded_inputs", rank=self.rank,
                  stages={plan.stages[i][0].name: plan.stage_inputs.holders[i] for i in plan.stage_inputs.replayed})
        set_calibration(block, False)  # the last stage may have left calibration mode on
        return packed_part(source, prefix, packed), layers, block

    def _stage(self, block_idx: int, plan: BlockPlan, i: int, stage: list[InputGroup]) -> tuple[
            dict[str, PackedLinear], list[LayerReport]]:
        """Stage i: collect → reduce → solve (baseline, validate) → share → install; its packed linears and
        layer reports."""
        block = plan.block
        # hessian_tokens=all: all tokens through all experts only where an expert's Hessian is collected
        # (the output is the same); routed: each expert sees its routed tokens only
        all_tokens = self.setup.moe.hessian_tokens == "all"
        set_calibration(block, all_tokens and any(expert_of(block, g) is not None for g in stage))
        reset_routed_tokens(block)
        aliases = shared_hessians(block, stage)  # MoE `all`: one all-token Hessian for every expert's gate/up
        collected = self._collect(block, [g for g in stage if g.name not in aliases], plan.stage_inputs, i,
                                  plan.unread[i])
        routed = routed_tokens(self.group, block_idx, block, stage, self.setup.moe)
        recollect_starved(block, stage, routed, self.setup.moe, collected,
                          lambda groups: self._collect(block, groups, plan.stage_inputs, i, frozenset()))
        strategy = stage_strategy(self.group, stage, aliases, plan.owners, self.setup.split_rows)
        with self.clock.timed("reduce"):
            reduced = strategy.reduce(collected.sums, collected.tokens, aliases)
        samples = validation_samples(
            block, stage, collected.samples | {name: collected.samples[first] for name, first in aliases.items()})
        with agree_on_errors(self.group):
            mine = self._solve_stage(block_idx, block, stage, strategy, reduced, samples, routed)
        with self.clock.timed("share"):
            installed = self._share_stage(block_idx, block, stage, strategy, mine)
        return installed, strategy.layer_reports()

    def _advance_reference_eval(self, block_idx: int, source: dict[str, torch.Tensor], quantized: set[str]) -> None:
        """The fp (and rtn) eval streams through the block's source weights, while it still has them all."""
        if self.eval is not None:
            with self.clock.timed("eval"):
                self.eval.advance_reference(block_idx, source, quantized)

    def _plan(self, block_idx: int, source: dict[str, torch.Tensor]) -> BlockPlan:
        """The block materialized from its source tensors, its owners, stages and child memo (workers/block_plan.py)."""
        options = PlanOptions(dtype=self.dtype, hessian_dtype=self.hessian_dtype, device=self.device, world=self.world,
                              true_sequential=self.setup.true_sequential, hessian_tokens=self.setup.moe.hessian_tokens,
                              stage_shortcut=self.stage_shortcut, child_memo=self.child_memo,
                              skip_unread_experts=self.skip_unread_experts)
        plan = self._planner.plan(self.blocks[block_idx], source, self.layout.block_prefix(block_idx), self.inputs,
                                  options, self._memo_placement)
        self._memo = plan.memo
        return plan

    def _memo_placement(self, block: nn.Module, signature: tuple, planned_bytes: int) -> str | None:
        """Where the block's child memo lives (workers/child_memo.memo_placement): "device", "host" or None."""
        gpu = None
        if self.device.type == "cuda":
            gpu = GpuRoom(total=torch.cuda.get_device_properties(self.device).total_memory,
                          peak_with_memo_on_host=self._peak_with_memo_on_host.get(signature),
                          moe=bool(routed_experts(block)))
        return memo_placement(planned_bytes, gpu, available_host_memory())

    def _collect(self, block: nn.Module, stage: list[InputGroup], stage_inputs: StageInputs,
                 stage_idx: int, unread: frozenset[str]) -> CollectedStage:
        """This rank's Hessian sums of the stage's input groups (workers/stage_collect.py), the experts
        modules at `unread` skipped."""
        with self.clock.timed("collect"), skipped(block, unread):
            return collect_stage(block, stage, self.inputs, stage_inputs, stage_idx, self.hessian_dtype, self.device,
                                 self.setup.validate_tokens, self._memo)

    def _solve_stage(self, block_idx: int, block: nn.Module, stage: list[InputGroup],
                     strategy: OwnerStage | RowSplitStage, reduced: Reduced, samples: dict[str, torch.Tensor],
                     routed: dict[str, int]) -> dict[str, PackedLinear]:
        """What this rank solves of the stage (`strategy.assign`), in batched calls (workers/stage_solve.py):
        its packed linears or row slices by linear; their reports go to the strategy."""
        works: list[GroupWork] = []
        assignments = []
        for g in stage:
            for linears, cfg in self._configs_of(block_idx, g):
                assignment = strategy.assign(block, g, linears)
                if assignment is None:
                    continue  # another rank's group, or every slice of this rank is empty
                H, n = reduced[g.name]
                assignments.append(assignment)
                works.append(GroupWork(group=assignment.group, rows=assignment.rows, cfg=cfg, hessian_sum=H,
                                       n_tokens=n, x_val=samples[g.name], routed_tokens=routed.get(g.name)))
        for w in works:
            self.rows_solved += sum((w.rows[lin][1] - w.rows[lin][0]) if w.rows is not None
                                    else block.get_submodule(lin).out_features for lin in w.group.linears)
        packed, reports = self._solve_groups(block_idx, block, works)
        for assignment, r in zip(assignments, reports):
            strategy.keep(assignment, r)
        return packed

    def _solve_groups(self, block_idx: int, block: nn.Module,
                      works: list[GroupWork]) -> tuple[dict[str, PackedLinear], list[list[LayerReport]]]:
        """GPTQ, the RTN baseline and kernel validation of every work (benchmarks add to it)."""
        settings = SolveSettings(rank=self.rank, prefix=self.layout.block_prefix(block_idx), block_idx=block_idx,
                                 moe=self.setup.moe, validate_tolerance=self.setup.validate_tolerance, pack=self._pack)
        return solve_groups(block, works, settings, self.clock)

    def _pack(self, results: list[GPTQResult], bits: int) -> list[PackedLinear]:
        """GPTQ v1 packing of a stage's linears (tests override it to corrupt a layer before its validation)."""
        return pack_linears(results, bits)

    def _share_stage(self, block_idx: int, block: nn.Module, stage: list[InputGroup],
                     strategy: OwnerStage | RowSplitStage, mine: dict[str, PackedLinear]) -> dict[str, PackedLinear]:
        """Every quantized linear of the stage, whole on every rank and installed into its block, so later
        stages collect on the quantized linears."""
        packed = {}
        for g in stage:
            for lin in g.linears:
                cfg = self._layer_config(block_idx, lin)
                if cfg is None:
                    continue  # skipped by quant.overrides: the part keeps its `.weight`
                packed[lin] = strategy.share(block.get_submodule(lin), g.name, mine.get(lin), cfg)
        install([block.get_submodule(lin) for lin in packed], list(packed.values()), self.dtype)
        return packed

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

    def _advance(self, block_idx: int, part: dict[str, torch.Tensor], built: nn.Module | None) -> nn.Module:
        """Forward the shard through the quantized block: `built`, the block this rank quantized (share
        installed every quantized linear as `dequantized_state` rebuilds it from the packed tensors, the
        other tensors are the source's: the same module, bitwise), or, for a replayed block, the block
        built from its packed tensors as a reader would."""
        block, memo = built, self._memo
        if block is None:
            part = {k: v.to(self.device) for k, v in part.items()}  # unpack on the GPU, not the host
            state = dequantized_state(part, self.layout.block_prefix(block_idx))
            block, memo = materialize(self.blocks[block_idx], state, self.dtype), None
        advanced = []
        with memo_pass(memo, len(self.inputs)):  # attention and MLP compute their last linear only (child_memo.py)
            for k, inp in enumerate(self.inputs):
                with memo_micro_batch(memo, k):
                    advanced.append(inp.advanced(forward_block(block, inp)))
        self.inputs = advanced
        return block

    def _hand_off(self, block_idx: int, to_host: HostCopy | None) -> dict[str, torch.Tensor] | None:
        """Rank 0 queues the block's host copy for its writer, or returns it without one (in-process callers)."""
        if to_host is not None and self.writer is not None:
            self.writer.submit(block_idx, to_host)
        elif to_host is not None:
            return to_host.result()
        return None

    def _bind(self, block: int | None) -> None:
        structlog.contextvars.bind_contextvars(job_id=self.setup.job_id, block=block, rank=self.rank)

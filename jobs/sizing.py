"""How big a job is before it runs: per-worker memory, disk, bytes moved per block and wall time, from shapes.

Pure arithmetic on the block shapes `jobs/plan.py` reads from the model's skeleton and on the spec's cluster
and calibration settings: no torch, no I/O. The memory terms follow what one rank holds at once in the block
loop (DESIGN.md §5, §6); on the 70B and 405B blocks of README "## Benchmarks" they come out 13 % and 9 %
above the measured peaks (tests/jobs/test_plan.py keeps them within 0-30 % above). MoE blocks come out
under: the child memo, the stage-replay inputs and the batched expert solves are not modelled (DeepSeek-V3's
MoE block: 48.6 GiB planned, 64.6 GiB measured on an H100, DESIGN.md §14). Times scale the measured blocks of
`BENCHMARKS` by weight count and calibration tokens: rough, and labelled so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayquant.workers.prefetch_placement import on_device

GIB = 2**30
GPU_BYTES = int(79.2 * GIB)  # one H100 80GB as torch reports it: the GPU a worker's memory is planned against

# what one worker process costs before any block: Python, torch and transformers imported, the Ray worker.
# Measured here as the peak RSS of a tiny-llama job's CPU worker (run-stats.json): 535 MiB with its tiny block.
WORKER_PROCESS_BYTES = 512 * 2**20
CUDA_CONTEXT_HOST_BYTES = 2**30  # rough: host memory of a CUDA context and its libraries (not measured here)
WRITER_BLOCKS = 3  # rank 0's packed blocks in host memory: one copying, one being written, one queued
# start-up (to workers_ready) and tail (eval, finish) of one job. GPU: README's CLI table (start-up 25.5-34.4 s,
# tail 11.5-15.2 s); CPU: the quick start's workers_ready line (12.1 s) and this machine's tiny-job tail
START_SECONDS = {True: 30.0, False: 12.0}
TAIL_SECONDS = {True: 15.0, False: 3.0}
# bytes per second between workers, assumed (not measured): NCCL inside one GPU node, Gloo between CPU processes
LINK_BYTES_PER_SECOND = {True: 50e9, False: 1e9}
# the share of a block's time that scales with calibration tokens: collect + advance of the 70B block in
# README's 2026-11-24 table, (1.27 + 0.83) / 3.00 s; the rest (solve, baseline, validate, share) scales with weights
TOKEN_SHARE = 0.7


@dataclass(frozen=True)
class MeasuredBlock:
    """One steady block as README "## Benchmarks" measured it: the reference a time estimate scales."""

    name: str
    gpu: bool  # one H100 per worker; False: CPU workers
    moe: bool
    weights: int  # parameters of one block (as jobs/plan.py counts them for synthetic://<preset>)
    workers: int
    tokens: int  # calibration tokens (n_samples × seq_len)
    seconds: float  # one block's wall time


BENCHMARKS: tuple[MeasuredBlock, ...] = (
    # README "Through the CLI on one H100 80GB (2026-12-06 ...)": "Llama-8B, 32 blocks on read | ... | 0.95 / 0.92 s"
    MeasuredBlock("Llama-8B (H100)", gpu=True, moe=False, weights=218_112_000, workers=1, tokens=128 * 2048,
                  seconds=0.95),
    # same table: "Llama-70B, all 80 blocks on read | ... | 3.20 / 3.19 s"
    MeasuredBlock("Llama-70B (H100)", gpu=True, moe=False, weights=855_654_400, workers=1, tokens=128 * 2048,
                  seconds=3.20),
    # README "Measured on one H100 80GB (2026-11-24 ...)": "block wall | 3.00 s ... | 11.4 s" (405B, in-process)
    MeasuredBlock("Llama-405B (H100)", gpu=True, moe=False, weights=3_187_703_808, workers=1, tokens=128 * 2048,
                  seconds=11.4),
    # CLI table: "Qwen3-30B-A3B, 17 of 48 blocks on read | 29.8 s | 10.7 s | 6.2 s"
    MeasuredBlock("Qwen3-30B-A3B (H100)", gpu=True, moe=True, weights=623_120_640, workers=1, tokens=128 * 2048,
                  seconds=6.2),
    # README "Using it": the quick start's block_done line ("seconds": 0.376; llama-tiny, 2 CPU workers, 32 × 256)
    MeasuredBlock("llama-tiny (2 CPU cores)", gpu=False, moe=False, weights=147_712, workers=2, tokens=32 * 256,
                  seconds=0.376),
)


@dataclass(frozen=True)
class StageShape:
    """One true_sequential sub-stage of a block (the whole block without true_sequential)."""

    hessian_widths: tuple[int, ...]  # in_features K of each Hessian the stage collects (a shared MoE one once)
    solves: tuple[tuple[int, int], ...]  # per input group: (K, out_features of its quantized linears stacked)
    shares_hessian: bool  # MoE experts' gate/up read one Hessian: such a stage keeps owners (no row split)

    def row_split(self, workers: int) -> bool:
        """workers/stage_strategy.stage_strategy's rule: fewer groups than ranks and no shared Hessian."""
        return workers > 1 and len(self.solves) < workers and not self.shares_hessian


@dataclass(frozen=True)
class BlockShape:
    """What sizes one block, read from the meta skeleton and the source's headers."""

    weights: int  # parameters of the block's source tensors
    source_bytes: int  # the same tensors in the source's dtype
    packed_bytes: int  # the block's tensors in the output (packed linears, norms, routers)
    hidden: int  # width of the hidden states between blocks
    widest_output: int  # the largest out_features of a block linear: the forward's widest intermediate
    stages: tuple[StageShape, ...]
    moe: bool  # holds routed experts


@dataclass(frozen=True)
class JobShape:
    """The spec's settings that size a job (cluster.*, calibration.*, the workers' fixed micro-batch)."""

    workers: int
    gpu: bool  # cluster.gpus_per_worker == 1: bf16 blocks, fp32 Hessians on the GPU; else fp32 / fp64 on the host
    n_samples: int
    seq_len: int
    eval_samples: int
    eval_rtn: bool
    micro_batch: int
    embedding_weights: int  # parameters every worker keeps for the whole job (embeddings, final norm)

    @property
    def compute_bytes(self) -> int:
        return 2 if self.gpu else 4  # block weights and activations: bfloat16 on a GPU, float32 on CPU

    @property
    def hessian_bytes(self) -> int:
        return 4 if self.gpu else 8  # DESIGN.md §12: fp32 sums on a GPU, fp64 on CPU workers

    @property
    def tokens(self) -> int:
        return self.n_samples * self.seq_len


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one worker holds at once on its compute device while a block runs (rank 0, the largest share)."""

    embeddings: int  # the embedding stage, kept for the whole job
    weights: int  # the block, its packed tensors, the rtn eval copy, the next block's share prefetched onto the device
    hessians: int  # Σxᵀx of the stage's input groups (the largest stage)
    solver: int  # the largest group's solve: two K×K fp32 factors and its stacked weights and codes in fp32
    activations: int  # this worker's calibration windows at the block's input and output
    eval_streams: int  # the held-out windows of every stream (fp, gptq, rtn), input and output
    forward: int  # one micro-batch's widest intermediates (gate, up, their product)

    @property
    def total(self) -> int:
        return (self.embeddings + self.weights + self.hessians + self.solver + self.activations + self.eval_streams
                + self.forward)


@dataclass(frozen=True)
class TrafficEstimate:
    """Bytes one worker receives per block (mean over ranks), per stage as run-stats.json counts them."""

    load: int  # the block's tensors the other ranks read, broadcast
    reduce: int  # Hessian sums (row chunks to every rank, or to each group's owner)
    share: int  # packed tensors solved by the other ranks

    @property
    def total(self) -> int:
        return self.load + self.reduce + self.share


@dataclass(frozen=True)
class BlockEstimate:
    device_memory: MemoryEstimate
    host_bytes: int  # one worker process (rank 0: its writer's blocks); CPU workers: the device memory too
    traffic: TrafficEstimate
    seconds: float  # rough: scaled from `reference`
    reference: str  # the MeasuredBlock the time is scaled from


def samples_per_worker(n: int, workers: int) -> int:
    """The largest contiguous share of n windows (driver._embed's tensor_split gives rank 0 the ceiling)."""
    return math.ceil(n / workers)


def device_memory(block: BlockShape, job: JobShape) -> MemoryEstimate:
    """What one worker holds while the block's largest stage is solved."""
    cb, w = job.compute_bytes, job.workers
    eval_on = job.eval_samples > 0
    # the block once (each linear's source weight is freed as its quantized copy is installed; the fp eval
    # stream's block is the source's), the rtn stream's rounded copy, the packed tensors; the next block's
    # share where the worker prefetches it onto the device (workers/prefetch_placement.py)
    copies = 1 + job.eval_rtn
    share = block.source_bytes // w
    prefetched = share if on_device(share, GPU_BYTES if job.gpu else None) else 0
    solver = 0
    for stage in block.stages:
        split = stage.row_split(w)
        for k, rows in stage.solves:
            solver = max(solver, 2 * k * k * 4 + 2 * math.ceil(rows / (w if split else 1)) * k * 4)
    streams = (2 + job.eval_rtn) if eval_on else 0
    window = job.seq_len * block.hidden * cb
    return MemoryEstimate(
        embeddings=job.embedding_weights * cb,
        weights=block.weights * cb * copies + block.packed_bytes + prefetched,
        hessians=max((sum(k * k for k in s.hessian_widths) * job.hessian_bytes for s in block.stages), default=0),
        solver=solver,
        activations=samples_per_worker(job.n_samples, w) * window * 2,
        eval_streams=samples_per_worker(job.eval_samples, w) * window * 2 * streams,
        forward=min(job.micro_batch, samples_per_worker(job.n_samples, w)) * job.seq_len * block.widest_output * cb * 3,
    )


def host_memory(block: BlockShape, job: JobShape, device: MemoryEstimate) -> int:
    """One worker process's host memory: the process, rank 0's writer queue, this rank's read of the next block;
    a CPU worker's compute memory is host memory too."""
    process = WORKER_PROCESS_BYTES + (CUDA_CONTEXT_HOST_BYTES if job.gpu else 0)
    writer = WRITER_BLOCKS * block.packed_bytes
    return process + writer + (block.source_bytes // job.workers if job.gpu else device.total)


def traffic(block: BlockShape, job: JobShape) -> TrafficEstimate:
    """Bytes received per worker and block: each rank reads 1/W and receives the rest; Hessians reduced in
    row chunks to every rank (2 (W-1)/W of each) or to their owner (W-1 copies on one of W ranks); packed
    tensors broadcast from the rank that solved them. The communication model of tests/bench/scaling_bench.py."""
    w = job.workers
    others = (w - 1) / w
    reduce = 0.0
    for stage in block.stages:
        hessians = sum(k * k for k in stage.hessian_widths) * job.hessian_bytes
        # an owner stage's shared MoE Hessian is also broadcast from its owner to every other rank
        reduce += hessians * others * (2 if stage.row_split(w) or stage.shares_hessian else 1)
    return TrafficEstimate(load=round(block.source_bytes * others), reduce=round(reduce),
                           share=round(block.packed_bytes * others))


def reference_block(block: BlockShape, job: JobShape) -> MeasuredBlock:
    """The measured block nearest in weight count among those on the same hardware, MoE with MoE if any."""
    same = [m for m in BENCHMARKS if m.gpu == job.gpu]
    kind = [m for m in same if m.moe == block.moe] or same
    return min(kind, key=lambda m: abs(math.log(block.weights / m.weights)))


def block_seconds(block: BlockShape, job: JobShape, moved: TrafficEstimate) -> tuple[float, str]:
    """Rough wall seconds of one block and the measured block it is scaled from: linear in weights, the token
    share linear in calibration tokens, compute split over the workers, plus the bytes moved at an assumed
    link speed."""
    ref = reference_block(block, job)
    one_worker = ref.seconds * ref.workers * block.weights / ref.weights
    one_worker *= TOKEN_SHARE * job.tokens / ref.tokens + (1 - TOKEN_SHARE)
    return one_worker / job.workers + moved.total / LINK_BYTES_PER_SECOND[job.gpu], ref.name


def estimate_block(block: BlockShape, job: JobShape) -> BlockEstimate:
    device = device_memory(block, job)
    moved = traffic(block, job)
    seconds, reference = block_seconds(block, job, moved)
    return BlockEstimate(device_memory=device, host_bytes=host_memory(block, job, device), traffic=moved,
                         seconds=seconds, reference=reference)


def job_seconds(block_seconds_sum: float, gpu: bool) -> float:
    """Rough wall time of a whole job: start-up, the blocks, the tail (eval, finish), without uploads."""
    return START_SECONDS[gpu] + block_seconds_sum + TAIL_SECONDS[gpu]

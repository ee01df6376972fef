"""The job driver: preflight, start the workers, run the per-block loop, resume, finish.

Turns the JobSpec into frozen records before anything crosses into workers. The per-block loop
is DESIGN.md's: every worker runs the block's stages together; rank 0 writes the packed block into
its planned shard on a background thread while the next block runs, and the driver marks the block
done once rank 0 says its bytes are durable: the marker is the resume point. The driver receives
layer records only, never tensors. Start-up overlaps: the worker actors are created before the
shards are planned and the calibration windows cut, so their processes start and import meanwhile.
A worker that dies is replaced with the whole set, which replays the durable blocks and goes on
(`_quantize_with_recovery`, DESIGN.md §4 step 6).
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property, partial
from pathlib import Path

import ray
import structlog
import torch

from rayquant.jobs.cluster import (WORKER_CLASS, Cluster, WorkerDied, connect, create_workers, current_stage, disconnect,
                                   freeze_startup_objects, replace_workers, wait_all)
from rayquant.jobs.input_errors import INPUT_ERRORS
from rayquant.jobs.loader_compat import loader_warnings
from rayquant.jobs.logs import stderr_is_terminal
from rayquant.jobs.progress import JobProgress
from rayquant.jobs.publishing import Publisher, work_dir
from rayquant.jobs.shard_closer import ShardCloser
from rayquant.jobs.spec import JobSpec
from rayquant.solver.gptq import GPTQConfig
from rayquant.storage import staging
from rayquant.storage.calibration import CalibrationSet, load_calibration, vocab_size_of, windows_sha256
from rayquant.storage.finished_checkpoint import finish_checkpoint, gptq_quantization_config
from rayquant.storage.job_records import (BlockMarker, BlockStats, EvalReport, JobReport, LayerReport,
                                          QuantizationConfig, RunStats)
from rayquant.storage.loss_plot import import_matplotlib_in_background
from rayquant.storage.model_source import ModelSource, open_model_source
from rayquant.storage.output_claims import OutputLock, lock_holder
from rayquant.storage.output_layout import STAGING
from rayquant.storage.shard_plan import ShardPlan
from rayquant.storage.sinks import Sink, is_remote, open_sink
from rayquant.workers.adapter import build_skeleton, check_decoder_architecture, find_layout
from rayquant.workers.moe import MoEConfig, unfuse_experts
from rayquant.workers.evaluation import perplexity
from rayquant.workers.block_worker import BlockTask, WorkerSetup
from rayquant.workers.block_writer import OutputTarget
from rayquant.workers.layer_overrides import (LayerOverride, block_linear_names, check_fused_units,
                                             check_overrides_match, gptq_dynamic)

log = structlog.get_logger()

STAGES = ("load", "plan", "collect", "reduce", "solve", "baseline", "validate", "share", "advance", "eval", "handoff")


@dataclass(frozen=True)
class JobOutcome:
    uri: str
    n_blocks: int
    resumed_from: int  # first block quantized in this run (0 = fresh)
    already_complete: bool
    block_stats: tuple[BlockStats, ...]  # per block, as run-stats.json holds them (replayed: the quantizing run's)


def gptq_config(spec: JobSpec) -> GPTQConfig:
    q = spec.quant
    return GPTQConfig(bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, sym=q.sym,
                      static_groups=q.static_groups, damp_percent=q.damp_percent,
                      damp_auto_increment=q.damp_auto_increment, act_group_aware=q.act_group_aware)


def quantization_config(spec: JobSpec) -> QuantizationConfig:
    cfg = gptq_config(spec)
    return gptq_quantization_config(
        bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym, damp_percent=cfg.damp_percent,
        true_sequential=spec.quant.true_sequential, static_groups=cfg.static_groups,
        dynamic=gptq_dynamic(layer_overrides(spec)), act_group_aware=cfg.act_group_aware)


def layer_overrides(spec: JobSpec) -> tuple[LayerOverride, ...]:
    return tuple(LayerOverride(pattern=o.pattern, bits=o.bits, group_size=o.group_size, skip=o.skip)
                 for o in spec.quant.overrides)


@dataclass(frozen=True)
class OpenedJob:
    """Preflight's first half: what a job reads before any worker starts (no weights)."""

    source: ModelSource
    fingerprint: str  # the output's identity (spec + source revision)
    resolved: dict  # the spec with defaults filled in, as the manifest records it
    state: staging.OutputState  # what the (local or work) output directory already holds
    out_dir: Path  # where the output is built: output.uri if local, else the work directory it uploads from
    sink: Sink | None  # publishes a remote output.uri (s3://, hf://); None for a local directory
    published: bool  # the sink holds this job's finished output already


def open_job(spec: JobSpec) -> OpenedJob:
    """Open the model source (config and headers), check the overrides, inspect the output.

    Raises:
        the typed input errors of storage and workers (jobs.input_errors.INPUT_ERRORS).
    """
    source = open_model_source(spec.model.source)
    check_decoder_architecture(source.config)
    if spec.quant.overrides:  # the skeleton is on the meta device: listing its linears reads no weights
        skeleton = build_skeleton(source.config, torch.bfloat16)
        unfuse_experts(skeleton)  # MoE: rules see the per-expert linears the workers quantize
        linear_names = block_linear_names(skeleton, find_layout(skeleton))
        overrides = layer_overrides(spec)
        check_overrides_match(overrides, linear_names)
        check_fused_units(overrides, gptq_config(spec), linear_names)
    fingerprint = spec.fingerprint(source.revision)
    out_dir = work_dir(spec, fingerprint)
    sink = open_sink(spec.output.uri)
    published = sink is not None and _published(sink, fingerprint)
    return OpenedJob(source=source, fingerprint=fingerprint, resolved=spec.resolved(),
                     state=staging.inspect_output(out_dir, fingerprint, spec.output.verify), out_dir=out_dir,
                     sink=sink,
                     published=published)


def _published(sink: Sink, fingerprint: str) -> bool:
    """Preflight of a remote output before any work: reachable, writable, and this job's or empty.

    Raises:
        OutputConflict: the target holds another job's finished checkpoint.
        the sink's errors (not found, access denied, unreachable).
    """
    sink.check_writable()
    manifest = sink.published_manifest()
    if manifest is None:
        return False
    other = manifest.get("job_fingerprint")
    if other != fingerprint:
        raise staging.OutputConflict(
            f"output.uri {sink.uri} holds the finished checkpoint of another job (fingerprint {str(other)[:12]}, "
            f"this job {fingerprint[:12]}); choose another output.uri or delete what is there")
    return True


def calibrate(spec: JobSpec, source: ModelSource) -> CalibrationSet:
    """Preflight's second half: the calibration and held-out windows, tokenized and cut.

    Raises:
        the typed calibration input errors (jobs.input_errors.INPUT_ERRORS).
    """
    c = spec.calibration
    return load_calibration(c.dataset, source.path, c.n_samples, c.seq_len, c.eval_samples, c.seed,
                            packing=c.packing, min_length=c.min_length, text_field=c.text_field, split=c.split,
                            vocab_size=vocab_size_of(source.config))


def run_job(spec: JobSpec, job_id: str | None = None, worker_class: str | type = WORKER_CLASS,
            cluster: Cluster | None = None, verbose: bool = False, workers: list | None = None) -> JobOutcome:
    """Quantize the spec's model into its output; resume from block markers if present.

    Runs on `cluster` if given (the CLI starts Ray while this module is imported), else connects
    itself (embedded Ray without cluster.address) and disconnects at the end. `workers`: the actors
    (`cluster.create_workers`) if the caller created them already (the CLI does, as soon as Ray is up);
    else they are created here from `worker_class`. Either way they are killed at the end.
    `verbose`: the workers log debug events too.

    Raises:
        the typed input errors of spec, storage and workers (jobs.input_errors.INPUT_ERRORS).
    """
    job_id = job_id or uuid.uuid4().hex[:12]
    structlog.contextvars.bind_contextvars(job_id=job_id, block=None)
    own = cluster is None
    if own:
        cluster = connect(spec.cluster, verbose=verbose)
    try:
        c = spec.cluster
        if workers is None:
            workers = create_workers(worker_class, c.num_workers, c.cpus_per_worker, c.gpus_per_worker, verbose)
        respawn = partial(replace_workers, worker_class=worker_class, num_cpus=c.cpus_per_worker,
                          num_gpus=c.gpus_per_worker, verbose=verbose)
        return _run(spec, job_id, workers, cluster, respawn)
    finally:
        if own:
            disconnect(cluster)


def _run(spec: JobSpec, job_id: str, workers: list, cluster: Cluster, respawn: Callable[[list], list]) -> JobOutcome:
    job = open_job(spec)
    out_dir, state = job.out_dir, job.state
    if job.published or (state.complete and job.sink is None):
        log.info("job_already_complete", output=spec.output.uri)
        _kill(workers)
        return JobOutcome(uri=spec.output.uri, n_blocks=0, resumed_from=0, already_complete=True, block_stats=())
    # one job per output: a second one exits 2 naming the first; one killed on this host is taken over
    lock = OutputLock(_lock_uri(spec, out_dir), lock_holder(job_id), job.fingerprint)
    lock.acquire()
    try:
        state = staging.inspect_output(out_dir, job.fingerprint, "sizes")  # again, now that no job can change it
        if state.complete and job.sink is None:  # finished by the run this one waited for
            log.info("job_already_complete", output=spec.output.uri)
            _kill(workers)
            return JobOutcome(uri=spec.output.uri, n_blocks=0, resumed_from=0, already_complete=True, block_stats=())
        return _run_locked(spec, job_id, _Crew(workers, respawn, spec.cluster.max_worker_restarts), cluster, job,
                           state, lock)
    finally:
        lock.release()
        if out_dir.is_dir() and not any(out_dir.iterdir()):  # only the lock was here: a job that never started
            out_dir.rmdir()


def _lock_uri(spec: JobSpec, out_dir: Path) -> str:
    """Where the lock lives: the output itself, except a Hub output's (locked in its work directory, since a
    lock there would be commits on a branch)."""
    return str(out_dir) if spec.output.uri.startswith("hf://") else spec.output.uri


def _run_locked(spec: JobSpec, job_id: str, crew: _Crew, cluster: Cluster, job: OpenedJob,
                state: staging.OutputState, lock: OutputLock) -> JobOutcome:
    out_dir = job.out_dir
    publisher = Publisher(job.sink, out_dir) if job.sink is not None else None
    if state.complete:  # built here by an earlier run that stopped before its upload finished
        crew.kill()
        lock.check()
        publisher.publish()
        return JobOutcome(uri=spec.output.uri, n_blocks=state.done_blocks, resumed_from=state.done_blocks,
                          already_complete=False, block_stats=())
    fresh = state.done_blocks == 0 and not (out_dir / STAGING).exists()
    tail_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="non-block")
    closer = ShardCloser(out_dir, publisher)
    prep = _Preparation(spec, job, tail_pool)
    try:
        run = _quantize_with_recovery(spec, job_id, crew, cluster, prep, publisher, closer)
        calib, plan = prep.calib, run.started.target.plan
        evaluation = _evaluation(spec, run.streams, calib)
        log.info("eval_done", seconds=round(time.perf_counter() - run.eval_started, 2),
                 **(evaluation.perplexities() if evaluation is not None else {}))
        report = _report(spec, job.source.revision, calib, run.blocks.layers, evaluation)
        stats = RunStats(job_id=job_id, workers=spec.cluster.num_workers, blocks=tuple(run.blocks.run_stats),
                         eval_seconds=round(time.perf_counter() - run.eval_started, 3))
        t = time.perf_counter()
        run.tail_closed.result()
        lock.check()
        finish_checkpoint(out_dir, job.source, plan, report, job.resolved, run_stats=stats, non_block_written=True)
        if publisher is not None:
            publisher.publish()
        log.info("job_done", output=spec.output.uri, blocks=run.started.n_blocks,
                 blocks_seconds=round(run.eval_started - run.blocks_started, 2),
                 finish_seconds=round(time.perf_counter() - t, 2), worker_restarts=crew.restarts.total())
        return JobOutcome(uri=spec.output.uri, n_blocks=run.started.n_blocks, resumed_from=run.first_resume,
                          already_complete=False, block_stats=stats.blocks)
    except INPUT_ERRORS:
        if fresh:  # this input can never finish; a fixed input is a different job
            tail_pool.shutdown(wait=True)  # its writes end before the files go
            staging.discard_staging(out_dir)
        raise
    finally:
        tail_pool.shutdown(wait=True)  # never leave a thread writing into a staging area being removed
        closer.shutdown()
        if publisher is not None:
            publisher.close()
        crew.kill()


class _Restarts:
    """How often each rank's worker died in this job; one death past the budget ends the job."""

    def __init__(self, limit: int):
        self.limit = limit
        self.deaths: Counter[int | None] = Counter()

    def charge(self, died: WorkerDied) -> None:
        """Count `died`; past the budget, raise it again with how often that rank died.

        Raises:
            WorkerDied: the rank died more than `limit` times in this job.
        """
        self.deaths[died.rank] += 1
        if self.deaths[died.rank] > self.limit:
            raise WorkerDied(
                f"worker rank {died.rank} died {self.deaths[died.rank]} times in this job, more than "
                f"cluster.max_worker_restarts={self.limit}: look for what kills it (its log under Ray's "
                f"session_latest/logs: out of memory, a failing GPU, a lost node); last time: {died}",
                rank=died.rank) from died

    def total(self) -> int:
        return sum(self.deaths.values())


class _Crew:
    """The job's worker actors; a dead one is replaced with the whole set (jobs/cluster.replace_workers)."""

    def __init__(self, actors: list, respawn: Callable[[list], list], max_restarts: int):
        self.actors = actors
        self._respawn = respawn
        self.restarts = _Restarts(max_restarts)

    def replace(self, died: WorkerDied) -> None:
        """Charge `died` to its rank (raises past the budget) and start a fresh set of workers."""
        self.restarts.charge(died)
        t = time.perf_counter()
        self.actors = self._respawn(self.actors)
        log.warning("workers_replaced", dead_rank=died.rank, deaths_of_rank=self.restarts.deaths[died.rank],
                    seconds=round(time.perf_counter() - t, 2), reason=str(died))

    def kill(self) -> None:
        _kill(self.actors)


@dataclass
class _QuantizedRun:
    """What the blocks and the in-pass evaluation hand to the report and the finish."""

    started: _Started  # the last start-up's (after a recovery: the replacement workers')
    first_resume: int  # the first block this run quantized (its first start-up's resume point)
    blocks: _BlocksRun
    streams: dict[str, tuple[float, int]]
    blocks_started: float
    eval_started: float
    tail_closed: Future


def _quantize_with_recovery(spec: JobSpec, job_id: str, crew: _Crew, cluster: Cluster, prep: _Preparation,
                            publisher: Publisher | None, closer: ShardCloser) -> _QuantizedRun:
    """Start the workers, run every block and the in-pass evaluation. A worker that dies costs a fresh set
    of workers that resume from the last durable block: the blocks before it are replayed from their shards
    (the calibration shards move through the quantized blocks as a rerun's would), so the output is the
    bytes an undisturbed run writes.

    Raises:
        WorkerDied: a rank died more than cluster.max_worker_restarts times.
    """
    progress: JobProgress | None = None
    first_resume, tail_closed, died_at = None, None, None
    try:
        while True:
            try:
                started = _start(spec, job_id, crew.actors, cluster, prep)
                closer.begin(started.target.plan, started.resume, started.non_block)
                if progress is None:
                    first_resume = started.resume
                    c = spec.cluster
                    log.info("workers_ready", ray=cluster.where, workers=c.num_workers,
                             gpus_per_worker=c.gpus_per_worker, cpus_per_worker=c.cpus_per_worker,
                             ray_seconds=round(cluster.seconds, 2),
                             seconds=round(time.perf_counter() - cluster.started, 2))
                    progress = JobProgress(spec.name, started.n_blocks, started.resume, terminal=stderr_is_terminal(),
                                           status_dir=prep.job.out_dir / STAGING)
                    if publisher is not None:
                        publisher.on_uploaded = progress.uploaded
                    import_matplotlib_in_background()  # the finish draws the model card's picture
                    freeze_startup_objects()  # no full garbage collection walks the imports during the blocks
                    t_blocks = time.perf_counter()
                else:
                    progress.rewind()
                blocks = _run_blocks(crew.actors, _BlockRange(job_id, started.n_blocks, started.resume, died_at),
                                     started.target, progress, closer)
                structlog.contextvars.bind_contextvars(block=None)
                if tail_closed is None:  # the shards still open close (hash the rest, rename) during the eval
                    tail_closed = closer.finish()
                t_eval = time.perf_counter()
                streams = wait_all([w.call.remote("evaluate") for w in crew.actors], workers=crew.actors)[0]
                return _QuantizedRun(started, first_resume, blocks, streams, t_blocks, t_eval, tail_closed)
            except WorkerDied as died:
                died_at = time.perf_counter()
                structlog.contextvars.bind_contextvars(block=None)
                closer.drain()  # shards closing (renamed) while the new workers read them back would race
                prep.drain()
                crew.replace(died)
    finally:
        if progress is not None:
            progress.close()


class _Preparation:
    """The driver's half of start-up, done once however often the workers start: the calibration windows,
    the staging area, the shards, the copy of the non-block tensors."""

    def __init__(self, spec: JobSpec, job: OpenedJob, tail_pool: ThreadPoolExecutor):
        self.spec, self.job, self.tail_pool = spec, job, tail_pool
        self.non_block: Future | None = None

    @cached_property
    def calib(self) -> CalibrationSet:
        t = time.perf_counter()
        calib = calibrate(self.spec, self.job.source)
        log.info("calibration_ready", seconds=round(time.perf_counter() - t, 2), windows=len(calib.samples))
        return calib

    def output(self, plan: ShardPlan) -> int:
        """Staging, shards and free space for `plan`; returns the resume point (the first block without a
        durable marker, counted now: after a recovery, the markers written since the job started count)."""
        out_dir, job = self.job.out_dir, self.job
        staging.begin_staging(out_dir, job.fingerprint, job.resolved)
        done = staging.inspect_output(out_dir, job.fingerprint, "sizes").done_blocks
        resume = staging.resume_point(out_dir, plan, done)
        staging.check_free_space(out_dir, plan, resume)
        staging.prepare_shards(out_dir, plan)
        if self.non_block is None:  # embeddings, final norm and head go into their shard while the blocks run
            self.non_block = self.tail_pool.submit(staging.write_non_block_tensors, out_dir, job.source, plan)
        return resume

    def drain(self) -> None:
        """Wait for the tail pool's queued work (non-block tensors, tail shards closing); errors stay in their
        futures."""
        self.tail_pool.submit(lambda: None).result()


@dataclass(frozen=True)
class _Started:
    """What start-up hands to the block loop and the tail."""

    calib: CalibrationSet
    n_blocks: int
    resume: int  # the first block to quantize
    target: OutputTarget  # the output folder and its shard plan, as the workers have it
    non_block: Future  # the copy of the non-block tensors into their shard, on the tail pool


def _start(spec: JobSpec, job_id: str, workers: list, cluster: Cluster, prep: _Preparation) -> _Started:
    """Start-up, overlapped: the workers join and build their skeletons while the windows are cut here (the
    first time); rank 0 plans the shards; the windows are embedded while the output is prepared (staging,
    resume point, free space, shards; the non-block tensors start copying on the tail pool)."""
    job = prep.job
    out_dir = job.out_dir
    # synthetic:// is rebuilt (deterministically) on each worker's node; a local dir must be shared; a remote
    # source goes to the workers as opened here, pinned to the revision resolved here
    model_path = spec.model.source if spec.model.source.startswith("synthetic://") else str(job.source.path)
    remote_source = job.source if is_remote(spec.model.source) else None
    # the actors import (since Ray started), join the process group and build their skeletons
    # while the calibration windows are cut here
    rendezvous = workers[0].rendezvous_address.remote(cluster.loopback)
    setups = worker_setups(spec, job_id, model_path, remote_source, loopback=cluster.loopback)
    joined = [w.setup.remote(s, rendezvous) for w, s in zip(workers, setups, strict=True)]
    calib = prep.calib
    n_blocks = wait_all(joined, workers=workers)[0]
    # rank 0 plans the shards from the skeleton it has built: the driver needs no model classes.
    # Before the embedding: capturing block 0's inputs swaps modules of that skeleton for a moment.
    plan = wait_all([workers[0].call.remote("plan_output", spec.output.max_shard_bytes)], workers=workers)[0]
    embedded = _embed(workers, calib)  # while the output is prepared here
    resume = prep.output(plan)
    log.info("job_planned", model=spec.model.source, revision=job.source.revision[:12],
             output=spec.output.uri, work_dir=str(out_dir), workers=spec.cluster.num_workers,
             samples=len(calib.samples), seq_len=spec.calibration.seq_len,
             resume_from=resume, shards=len(plan.shards), output_bytes=plan.total_tensor_bytes,
             windows_sha256=calib.window_sha256[:16])
    for warning in loader_warnings(spec):
        log.warning("loader_compatibility", detail=warning)
    target = OutputTarget(str(out_dir), plan)
    wait_all(embedded + [w.call.remote("set_output", target) for w in workers], workers=workers)
    return _Started(calib, n_blocks, resume, target, prep.non_block)


def _kill(workers: list) -> None:
    for w in workers:
        ray.kill(w)


def worker_setups(spec: JobSpec, job_id: str, model_path: str, source: ModelSource | None = None,
                  loopback: bool | None = None) -> list[WorkerSetup]:
    """One WorkerSetup per rank; `loopback`: rendezvous on 127.0.0.1 (default: no cluster.address)."""
    c = spec.cluster
    return [WorkerSetup(
        job_id=job_id, rank=rank, world_size=c.num_workers, model_path=model_path,
        loopback=c.address is None if loopback is None else loopback,
        gptq=gptq_config(spec), overrides=layer_overrides(spec), true_sequential=spec.quant.true_sequential,
        num_threads=c.cpus_per_worker, device="cuda" if c.gpus_per_worker else "cpu",
        gpu_activations=spec.quant.gpu_activations,
        eval_on=spec.calibration.eval_samples > 0, eval_rtn=spec.calibration.eval_rtn,
        moe=MoEConfig(**spec.quant.moe.model_dump()),
        source=source, rendezvous_timeout_s=c.rendezvous_timeout_s, collective_timeout_s=c.collective_timeout_s,
    ) for rank in range(c.num_workers)]


def _embed(workers: list, calib: CalibrationSet) -> list:
    """Hand each rank its 1/W of the calibration and held-out windows (contiguous slices) to embed."""
    world = len(workers)
    shards = calib.samples.tensor_split(world)
    eval_shards = calib.eval_samples.tensor_split(world)
    return [w.call.remote("embed", shard.clone(), eval_shard.clone())
            for w, shard, eval_shard in zip(workers, shards, eval_shards, strict=True)]


@dataclass(frozen=True)
class _BlockRange:
    """The blocks of this run: 0 .. n_blocks - 1; those below `resume` are durable already."""

    job_id: str
    n_blocks: int
    resume: int  # the first block to quantize; the ones before are replayed from their shards
    recovering_since: float | None = None  # perf_counter() when a worker died: this run replaces its work

    def tasks(self) -> Iterator[BlockTask]:
        return (BlockTask(self.job_id, b, replay=b < self.resume) for b in range(self.n_blocks))


@dataclass
class _BlocksRun:
    """What the block loop hands to the report, run-stats.json and JobOutcome."""

    layers: list[LayerReport] = field(default_factory=list)
    run_stats: list[BlockStats] = field(default_factory=list)  # index = block, as its marker keeps them


def _run_blocks(workers: list, blocks: _BlockRange, target: OutputTarget, progress: JobProgress,
                closer: ShardCloser) -> _BlocksRun:
    """Every block in order: blocks below `blocks.resume` are replayed from their shards, the rest quantized.

    Block b's marker is written while block b+1 runs, as soon as rank 0 reports b's bytes durable; `closer`
    then hashes on through b's shard, and closes it if b was its last block (checksum, final name, upload).
    """
    run = _BlocksRun()
    out_dir = Path(target.out_dir)
    unmarked: BlockMarker | None = None  # its block written, but not yet durable
    for task in blocks.tasks():
        b = task.block_idx
        if b == blocks.resume:
            _log_recovered(blocks)
        structlog.contextvars.bind_contextvars(block=b)
        t = time.perf_counter()
        refs = [w.call.remote("run_block", task) for w in workers]
        if unmarked is not None:
            _mark_durable(workers[0], target, closer, run, unmarked)
            unmarked = None
        results = wait_all(refs, on_wait=_stage_poller(workers[0], progress) if progress.shows_stages else None,
                           workers=workers)
        seconds = {k: max(r.seconds.get(k, 0.0) for r in results) for k in STAGES}
        if task.replay:  # the records and stats of the run that quantized it
            marker = staging.read_block_marker(out_dir, b)
            run.layers += marker.layers
            block_stats = marker.stats
        else:
            block_layers = sorted((x for r in results for x in r.layers), key=lambda x: x.name)
            block_stats = _block_stats(b, results, seconds)
            run.layers += block_layers
            unmarked = BlockMarker(block_idx=b, layers=tuple(block_layers), stats=block_stats)
        run.run_stats.append(block_stats)
        moved = {k: sum(r.bytes_received.get(k, 0) for r in results) for k in ("load", "reduce", "share")}
        progress.block_done(b, time.perf_counter() - t, replayed=task.replay,
                            mib_moved=round(sum(moved.values()) / 2**20, 2),
                            stages={k: round(v, 3) for k, v in seconds.items()})
    if blocks.resume >= blocks.n_blocks:
        _log_recovered(blocks)
    if unmarked is not None:
        _mark_durable(workers[0], target, closer, run, unmarked)
    return run


def _log_recovered(blocks: _BlockRange) -> None:
    """After a worker died: the replacement workers have replayed every durable block and reach where the
    dead one was (the recovery's whole cost: the new workers' start-up and the replay)."""
    if blocks.recovering_since is not None:
        log.warning("recovered", resume_from=blocks.resume,
                    seconds=round(time.perf_counter() - blocks.recovering_since, 2))


def _mark_durable(rank0, target: OutputTarget, closer: ShardCloser, run: _BlocksRun, marker: BlockMarker) -> None:
    """Wait until rank 0's writer has marker's block on disk, then mark it done (its stats, here and in `run`,
    gain the writer's seconds) and tell `closer` (its errors surface at closer.finish())."""
    t = time.perf_counter()
    b = marker.block_idx
    stats = marker.stats.with_persist(round(wait_all([rank0.call.remote("wait_durable", b)], workers=[rank0])[0], 4))
    run.run_stats[b] = stats
    out_dir = Path(target.out_dir)
    staging.mark_block_done(out_dir, b, layers=list(marker.layers), stats=stats)
    closer.block_durable(b)
    log.debug("block_durable", block=b, waited_seconds=round(time.perf_counter() - t, 3))


def _stage_poller(rank0, progress: JobProgress):
    """Between waits on a block: ask rank 0 which stage it is in and show it."""
    def poll() -> None:
        stage = current_stage(rank0)
        if stage is not None and stage[0] is not None:
            progress.stage(*stage)
    return poll


def _report(spec: JobSpec, revision: str, calib: CalibrationSet, layers: list[LayerReport],
            evaluation: EvalReport | None) -> JobReport:
    return JobReport(
        job=spec.name, source_revision=revision, calibration_dataset=calib.description,
        calibration_windows_sha256=calib.window_sha256, calibration_window_sha256s=calib.window_sha256s,
        quantization=quantization_config(spec), layers=tuple(sorted(layers, key=lambda layer: layer.name)),
        eval=evaluation,
    )


def _evaluation(spec: JobSpec, streams: dict[str, tuple[float, int]], calib) -> EvalReport | None:
    """Perplexities of the held-out windows from the in-pass streams (fp, gptq, rtn if asked)."""
    if not streams:
        return None
    ppl = {name: perplexity(*stream) for name, stream in streams.items()}
    return EvalReport(fp_ppl=ppl["fp"], gptq_ppl=ppl["gptq"], ppl_delta=ppl["gptq"] - ppl["fp"], rtn_ppl=ppl.get("rtn"),
                      n_windows=len(calib.eval_samples), seq_len=spec.calibration.seq_len,
                      n_tokens=streams["gptq"][1], windows_sha256=windows_sha256(calib.eval_samples))


def _block_stats(block_idx: int, results: list, seconds: dict[str, float]) -> BlockStats:
    """What this run measured for one block: not part of the output's bytes (see run-stats.json)."""
    return BlockStats(block=block_idx, seconds={k: round(v, 4) for k, v in seconds.items()},
                      peak_memory_bytes=tuple(r.peak_memory_bytes for r in results),
                      bytes_received=tuple(r.bytes_received for r in results))

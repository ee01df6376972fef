"""The job driver: plan, start the workers, run the per-block loop, resume, assemble.

Turns the JobSpec into frozen records before anything crosses into workers. The per-block loop
is DESIGN.md's: every worker runs the block's stages together; rank 0 hands back the packed block,
which the driver persists as a part file and then marks done — the marker is the resume point.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import ray
import structlog
import torch

from rayquant.jobs.input_errors import INPUT_ERRORS
from rayquant.jobs.spec import JobSpec
from rayquant.solver.gptq import GPTQConfig
from rayquant.storage import checkpoint
from rayquant.storage.calibration import CalibrationSet, load_calibration, vocab_size_of, windows_sha256
from rayquant.storage.model_source import open_model_source
from rayquant.workers.adapter import build_skeleton, check_decoder_architecture, find_layout
from rayquant.workers.moe import MoEConfig, unfuse_experts
from rayquant.workers.evaluation import perplexity
from rayquant.workers.block_worker import BlockTask, BlockWorker, PeerFailed, WorkerSetup
from rayquant.workers.layer_overrides import (LayerOverride, block_linear_names, check_fused_units,
                                             check_overrides_match, gptq_dynamic)

log = structlog.get_logger()

WORKER_ENV = {"worker_process_setup_hook": "rayquant.jobs.cli.configure_worker_logging"}
STAGES = ("load", "plan", "collect", "reduce", "solve", "baseline", "validate", "share", "advance", "eval", "handoff", "persist")


@dataclass(frozen=True)
class JobOutcome:
    uri: str
    n_blocks: int
    resumed_from: int  # first block quantized in this run (0 = fresh)
    already_complete: bool
    stage_seconds: list[dict[str, float]]  # per block, slowest rank's seconds per stage
    bytes_moved: list[dict[str, int]]  # per block: bytes that crossed between workers, per stage


def gptq_config(spec: JobSpec) -> GPTQConfig:
    q = spec.quant
    return GPTQConfig(bits=q.bits, group_size=q.group_size, desc_act=q.desc_act, sym=q.sym,
                      static_groups=q.static_groups, damp_percent=q.damp_percent,
                      damp_auto_increment=q.damp_auto_increment, act_group_aware=q.act_group_aware and not q.desc_act)


def quantization_config(spec: JobSpec) -> dict:
    cfg = gptq_config(spec)
    return checkpoint.gptq_quantization_config(
        bits=cfg.bits, group_size=cfg.group_size, desc_act=cfg.desc_act, sym=cfg.sym, damp_percent=cfg.damp_percent,
        true_sequential=spec.quant.true_sequential, static_groups=cfg.static_groups,
        dynamic=gptq_dynamic(layer_overrides(spec)), act_group_aware=cfg.act_group_aware)


def layer_overrides(spec: JobSpec) -> tuple[LayerOverride, ...]:
    return tuple(LayerOverride(pattern=o.pattern, bits=o.bits, group_size=o.group_size, skip=o.skip)
                 for o in spec.quant.overrides)


def run_job(spec: JobSpec, job_id: str | None = None, worker_class: type = BlockWorker) -> JobOutcome:
    """Quantize the spec's model into its output; resume from block markers if present.

    Raises:
        the typed input errors of spec, storage and workers (jobs.input_errors.INPUT_ERRORS).
    """
    job_id = job_id or uuid.uuid4().hex[:12]
    structlog.contextvars.bind_contextvars(job_id=job_id, block=None)
    out_dir = Path(spec.output.uri)

    # Preflight: everything that reads no weights, before anything is written.
    source = open_model_source(spec.model.source)
    check_decoder_architecture(source.config)
    if spec.quant.overrides:  # the skeleton is on the meta device: listing its linears reads no weights
        skeleton = build_skeleton(source.config, torch.bfloat16)
        unfuse_experts(skeleton)  # MoE: rules see the per-expert linears the workers quantize
        linear_names = block_linear_names(skeleton, find_layout(skeleton))
        overrides = layer_overrides(spec)
        check_overrides_match(overrides, linear_names)
        check_fused_units(overrides, gptq_config(spec), linear_names)
    c = spec.calibration
    calib = load_calibration(c.dataset, source.path, c.n_samples, c.seq_len, c.eval_samples, c.seed,
                             packing=c.packing, min_length=c.min_length, text_field=c.text_field, split=c.split,
                             vocab_size=vocab_size_of(source.config))
    fingerprint = spec.fingerprint(source.revision)
    resolved = spec.resolved()
    state = checkpoint.inspect_output(out_dir, fingerprint)
    if state.complete:
        log.info("job_already_complete", output=str(out_dir))
        return JobOutcome(str(out_dir), 0, 0, True, [], [])
    log.info("job_planned", model=spec.model.source, revision=source.revision[:12], output=str(out_dir),
             workers=spec.cluster.num_workers, samples=len(calib.samples), seq_len=spec.calibration.seq_len,
             resume_from=state.done_blocks, windows_sha256=calib.window_sha256[:16])

    fresh = state.done_blocks == 0 and not (out_dir / checkpoint.STAGING).exists()
    owns_ray = not ray.is_initialized()
    if owns_ray:
        _connect(spec)
    workers = []
    try:
        # synthetic:// is rebuilt (deterministically) on each worker's node; a local dir must be shared
        model_path = spec.model.source if spec.model.source.startswith("synthetic://") else str(source.path)
        workers = _start_workers(spec, job_id, model_path, calib.samples, calib.eval_samples, worker_class)
        rendezvous = ray.get(workers[0].rendezvous_address.remote())
        n_blocks = _gather([w.start.remote(rendezvous) for w in workers])[0]
        checkpoint.begin_staging(out_dir, fingerprint, resolved)
        stage_seconds, bytes_moved, layers, run_stats = [], [], [], []
        t_job = time.perf_counter()
        for b in range(n_blocks):
            structlog.contextvars.bind_contextvars(block=b)
            replay = checkpoint.read_block_part(out_dir, b) if b < state.done_blocks else None
            t = time.perf_counter()
            results = _gather([w.run_block.remote(BlockTask(job_id, b, replay)) for w in workers])
            seconds = {k: max(r.seconds.get(k, 0.0) for r in results) for k in STAGES[:-1]}
            if replay is None:
                t_persist = time.perf_counter()
                block_layers = sorted((asdict(x) for r in results for x in r.layers), key=lambda x: x["name"])
                checkpoint.write_block_part(out_dir, b, results[0].tensors)
                seconds["persist"] = time.perf_counter() - t_persist
                block_stats = _block_stats(b, results, seconds)
                checkpoint.mark_block_done(out_dir, b, layers=block_layers, stats=block_stats)
                layers += block_layers
            else:  # the stats of the run that quantized it
                layers += checkpoint.read_block_layers(out_dir, b)
                block_stats = checkpoint.read_block_stats(out_dir, b)
            run_stats.append(block_stats)
            stage_seconds.append(seconds)
            moved = {k: sum(r.bytes_received.get(k, 0) for r in results) for k in ("load", "reduce", "share")}
            bytes_moved.append(moved)
            elapsed = time.perf_counter() - t_job
            log.info("block_done", progress=f"{b + 1}/{n_blocks}", replayed=replay is not None,
                     seconds=round(time.perf_counter() - t, 2),
                     eta_s=round(elapsed / (b + 1) * (n_blocks - b - 1), 1),
                     mib_moved=round(sum(moved.values()) / 2**20, 2), **{k: round(v, 3) for k, v in seconds.items()})
        structlog.contextvars.bind_contextvars(block=None)
        t = time.perf_counter()
        streams = _gather([w.evaluate.remote() for w in workers])[0]
        evaluation = _evaluation(spec, streams, calib)
        log.info("eval_done", seconds=round(time.perf_counter() - t, 2),
                 **{k: v for k, v in evaluation.items() if k.endswith("_ppl")})
        report = _report(spec, source.revision, calib, layers, evaluation)
        stats = {"job_id": job_id, "workers": spec.cluster.num_workers, "blocks": run_stats,
                 "eval_seconds": round(time.perf_counter() - t, 3)}
        checkpoint.assemble_checkpoint(out_dir, source, n_blocks, quantization_config(spec), report, resolved,
                                       run_stats=stats)
        log.info("job_done", output=str(out_dir), blocks=n_blocks, seconds=round(time.perf_counter() - t_job, 2))
        return JobOutcome(str(out_dir), n_blocks, state.done_blocks, False, stage_seconds, bytes_moved)
    except INPUT_ERRORS:
        if fresh:  # this input can never finish; a fixed input is a different job
            checkpoint.discard_staging(out_dir)
        raise
    finally:
        for w in workers:
            ray.kill(w)
        if owns_ray:
            ray.shutdown()


def _connect(spec: JobSpec) -> None:
    if spec.cluster.address is None:
        # Embedded Ray stays on loopback; the job uses exactly the CPUs its workers ask for.
        ray.init(num_cpus=spec.cluster.num_workers * spec.cluster.cpus_per_worker, include_dashboard=False,
                 logging_level="warning", runtime_env=WORKER_ENV)
    else:
        ray.init(address=spec.cluster.address, logging_level="warning", runtime_env=WORKER_ENV)


def _start_workers(spec: JobSpec, job_id: str, model_path: str, samples: torch.Tensor, eval_samples: torch.Tensor,
                   worker_class: type) -> list:
    c = spec.cluster
    remote_cls = ray.remote(num_cpus=c.cpus_per_worker, num_gpus=c.gpus_per_worker, max_restarts=0)(worker_class)
    shards = samples.tensor_split(c.num_workers)
    eval_shards = eval_samples.tensor_split(c.num_workers) if len(eval_samples) else [None] * c.num_workers
    workers = []
    for rank, (shard, eval_shard) in enumerate(zip(shards, eval_shards, strict=True)):
        setup = WorkerSetup(
            job_id=job_id, rank=rank, world_size=c.num_workers, loopback=c.address is None,
            model_path=model_path, samples=shard.clone(), gptq=gptq_config(spec), overrides=layer_overrides(spec),
            true_sequential=spec.quant.true_sequential, num_threads=c.cpus_per_worker,
            device="cuda" if c.gpus_per_worker else "cpu",
            eval_samples=None if eval_shard is None else eval_shard.clone(), eval_rtn=spec.calibration.eval_rtn,
            moe=MoEConfig(min_tokens=spec.quant.moe.min_tokens, starved_experts=spec.quant.moe.starved_experts),
        )
        workers.append(remote_cls.remote(setup))
    return workers


def _gather(refs: list) -> list:
    """Wait for every rank; raise the first real error (not a peer's 'another worker failed')."""
    errors, results = [], {}
    for i, ref in enumerate(refs):
        try:
            results[i] = ray.get(ref)
        except ray.exceptions.RayTaskError as err:
            errors.append(err.cause if err.cause is not None else err)
    real = [e for e in errors if not isinstance(e, PeerFailed)]
    if errors:
        raise (real or errors)[0]
    return [results[i] for i in range(len(refs))]


def _report(spec: JobSpec, revision: str, calib: CalibrationSet, layers: list[dict], evaluation: dict) -> dict:
    report = {
        "job": spec.name,
        "source_revision": revision,
        "calibration_dataset": asdict(calib.description),
        "calibration_windows_sha256": calib.window_sha256,
        "calibration_window_sha256s": list(calib.window_sha256s),  # one per window, in sample order
        "quantization": quantization_config(spec),
        "layers": sorted(layers, key=lambda layer: layer["name"]),
    }
    if evaluation:
        report["eval"] = evaluation
        report["metrics"] = {k: v for k, v in evaluation.items() if k.endswith("_ppl") or k == "ppl_delta"}
    return report


def _evaluation(spec: JobSpec, streams: dict[str, tuple[float, int]], calib) -> dict:
    """Perplexities of the held-out windows from the in-pass streams (fp, gptq, rtn if asked)."""
    if not streams:
        return {}
    out = {f"{name}_ppl": perplexity(*streams[name]) for name in sorted(streams)}
    out["ppl_delta"] = out["gptq_ppl"] - out["fp_ppl"]
    out.update(n_windows=len(calib.eval_samples), seq_len=spec.calibration.seq_len,
               n_tokens=streams["gptq"][1],
               windows_sha256=windows_sha256(calib.eval_samples))
    return out


def _block_stats(block_idx: int, results: list, seconds: dict[str, float]) -> dict:
    """What this run measured for one block: not part of the output's bytes (see run-stats.json)."""
    return {
        "block": block_idx,
        "seconds": {k: round(v, 4) for k, v in seconds.items()},
        "peak_memory_bytes": [r.peak_memory_bytes for r in results],
        "bytes_received": [r.bytes_received for r in results],
    }

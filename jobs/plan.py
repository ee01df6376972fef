"""`rayquant plan SPEC`: a dry run that sizes the cluster a job needs, in seconds, without Ray or a GPU.

Opens the source as a job does (config and safetensors headers only; `synthetic://` full-size presets
never touch disk), builds the meta skeleton, plans the output's shards exactly as rank 0 will
(workers/output_plan.py), and finds every block's input groups and true_sequential stages with the
workers' own functions, running the block's forward on fake tensors (no memory, no arithmetic). The
estimates (jobs/sizing.py) then say, per worker: device and host memory, local disk, bytes moved per
block and a rough wall time. Imports stay light at the top: `rayquant plan --help` loads neither torch
nor Ray.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from rayquant.jobs.sizing import BlockEstimate, BlockShape, JobShape, StageShape, estimate_block, job_seconds
from rayquant.jobs.spec import JobSpec, load_spec

if TYPE_CHECKING:  # torch and transformers load only when a plan is made, not for `rayquant plan --help`
    from rich.table import Table
    from torch import nn

    from rayquant.storage.model_source import ModelSource
    from rayquant.storage.shard_plan import ShardPlan
    from rayquant.workers.adapter import DecoderLayout, InputGroup
    from rayquant.workers.layer_overrides import LayerOverride


@dataclass(frozen=True)
class BlockKind:
    """Blocks of one shape, and what one of them costs."""

    blocks: tuple[int, ...]
    shape: BlockShape
    input_groups: int  # per block
    estimate: BlockEstimate


@dataclass(frozen=True)
class JobPlan:
    """What `rayquant plan` reports (`--json` prints it as is)."""

    name: str
    model: str  # model.source
    revision: str  # as the job's fingerprint takes it
    model_type: str
    n_blocks: int
    workers: int
    gpus_per_worker: int
    output_uri: str
    work_dir: str  # where the output is built on the driver's machine (output.uri itself if local)
    shards: int
    output_bytes: int  # every shard file, headers included: the checkpoint's model-*.safetensors
    kinds: tuple[BlockKind, ...]
    device_memory_bytes: int  # per worker, largest block (host memory for CPU workers)
    host_memory_bytes: int  # per worker process, largest block
    disk_bytes: int  # on the driver's machine, at work_dir
    bytes_moved_per_block: int  # per worker, largest block
    bytes_moved_total: int  # per worker, whole job
    seconds: float  # rough wall time of the whole job


def plan_job(spec: JobSpec) -> JobPlan:
    """Size the spec's job from the source's config and headers and the meta skeleton; reads no weights.

    Raises:
        the typed input errors of storage and workers (jobs.input_errors.INPUT_ERRORS): a missing or
        unreadable model, an unsupported architecture, overrides that match nothing or split a fused layer.
    """
    import torch

    from rayquant.jobs.driver import gptq_config, layer_overrides
    from rayquant.jobs.publishing import work_dir
    from rayquant.storage.model_source import open_model_source
    from rayquant.workers.adapter import build_skeleton, check_decoder_architecture, find_layout
    from rayquant.workers.layer_overrides import block_linear_names, check_fused_units, check_overrides_match
    from rayquant.workers.moe import unfuse_experts
    from rayquant.workers.output_plan import plan_output

    source = open_model_source(spec.model.source)
    check_decoder_architecture(source.config)
    model = build_skeleton(source.config, torch.bfloat16)
    unfuse_experts(model)  # the per-expert linears the workers quantize
    layout = find_layout(model)
    overrides = layer_overrides(spec)
    if overrides:  # the job's preflight (driver.open_job) fails on these before any worker starts
        linear_names = block_linear_names(model, layout)
        check_overrides_match(overrides, linear_names)
        check_fused_units(overrides, gptq_config(spec), linear_names)
    shard_plan = plan_output(source, model, layout, gptq_config(spec), overrides, spec.output.max_shard_bytes)
    shapes, groups = _block_shapes(spec, source, model, layout, shard_plan, overrides)
    job = _job_shape(spec, source, layout)
    kinds = _kinds(shapes, groups, job)
    per_block = [next(k for k in kinds if b in k.blocks).estimate for b in range(layout.n_blocks)]
    output_bytes = sum(shard.size for shard in shard_plan.shards)
    return JobPlan(
        name=spec.name, model=spec.model.source, revision=source.revision, model_type=source.config["model_type"],
        n_blocks=layout.n_blocks, workers=job.workers, gpus_per_worker=spec.cluster.gpus_per_worker,
        output_uri=spec.output.uri, work_dir=str(work_dir(spec, spec.fingerprint(source.revision))),
        shards=len(shard_plan.shards), output_bytes=output_bytes, kinds=kinds,
        device_memory_bytes=max(e.device_memory.total for e in per_block),
        host_memory_bytes=max(e.host_bytes for e in per_block),
        disk_bytes=output_bytes,  # remote outputs too: built in work_dir, removed only after publishing
        bytes_moved_per_block=max(e.traffic.total for e in per_block),
        bytes_moved_total=sum(e.traffic.total for e in per_block),
        seconds=job_seconds(sum(e.seconds for e in per_block), job.gpu),
    )


def _job_shape(spec: JobSpec, source: ModelSource, layout: DecoderLayout) -> JobShape:
    """The spec's sizing settings, with the micro-batch the job's workers get (driver.worker_setups)."""
    from rayquant.jobs.driver import worker_setups

    c = spec.calibration
    return JobShape(workers=spec.cluster.num_workers, gpu=spec.cluster.gpus_per_worker > 0, n_samples=c.n_samples,
                    seq_len=c.seq_len, eval_samples=c.eval_samples, eval_rtn=c.eval_rtn,
                    micro_batch=worker_setups(spec, "plan", spec.model.source)[0].micro_batch,
                    embedding_weights=_embedding_weights(source, layout))


def _block_shapes(spec: JobSpec, source: ModelSource, model: nn.Module, layout: DecoderLayout, shard_plan: ShardPlan,
                  overrides: tuple[LayerOverride, ...]) -> tuple[list[BlockShape], list[int]]:
    """Every block's BlockShape and input-group count (input groups probed once per block structure)."""
    from rayquant.jobs.driver import gptq_config
    from rayquant.storage.shard_plan import block_of_tensor
    from rayquant.workers.adapter import quantizable_linears
    from rayquant.workers.layer_overrides import layer_config
    from rayquant.workers.moe import routed_experts, sequential_stages, set_calibration, shared_hessians

    weights, source_bytes, packed = ([0] * layout.n_blocks for _ in range(3))
    for name, info in source.tensors.items():
        b = block_of_tensor(name, layout.blocks_path, layout.n_blocks)
        if b is not None:
            weights[b] += math.prod(info.shape)
            source_bytes[b] += info.end - info.start
    for shard in shard_plan.shards:
        for tensor in shard.tensors:
            if tensor.block_idx is not None:
                packed[tensor.block_idx] += tensor.nbytes
    blocks = model.get_submodule(layout.blocks_path)
    hidden, groups_of = _probe_input_groups(model, layout)
    gptq = gptq_config(spec)
    shapes, n_groups = [], []
    for b, block in enumerate(blocks):
        groups = groups_of[b]
        stages = (sequential_stages(block, groups, spec.quant.moe.hessian_tokens) if spec.quant.true_sequential
                  else [groups])
        stage_shapes = []
        # the workers' collect mode: experts share one gate/up Hessian under hessian_tokens=all only
        set_calibration(block, spec.quant.moe.hessian_tokens == "all")
        for stage in stages:
            aliases = shared_hessians(block, stage)
            solves = []
            for g in stage:
                quantized = [lin for lin in g.linears
                             if layer_config(layout.block_prefix(b) + lin, gptq, overrides) is not None]
                if quantized:
                    solves.append((g.in_features, sum(block.get_submodule(lin).out_features for lin in quantized)))
            stage_shapes.append(StageShape(
                hessian_widths=tuple(g.in_features for g in stage if g.name not in aliases),
                solves=tuple(solves), shares_hessian=bool(aliases)))
        widest = max((block.get_submodule(lin).out_features for lin in quantizable_linears(block)), default=hidden)
        shapes.append(BlockShape(weights=weights[b], source_bytes=source_bytes[b], packed_bytes=packed[b],
                                 hidden=hidden, widest_output=widest, stages=tuple(stage_shapes),
                                 moe=bool(routed_experts(block))))
        n_groups.append(len(groups))
    return shapes, n_groups


def _probe_input_groups(model: nn.Module, layout: DecoderLayout) -> tuple[int, list[list[InputGroup]]]:
    """The hidden width and each block's input groups, from the workers' own capture and grouping run on
    fake tensors: shapes and tensor identities propagate as in a real forward, nothing is allocated or
    computed. A ShapeEnv lets data-dependent ops (the MoE routing's bincount and where) return
    symbolic sizes instead of failing; transformers skips its data checks on fake tensors."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    from rayquant.workers.adapter import BlockInput, capture_block_inputs, find_input_groups, move_buffers
    from rayquant.workers.moe import set_calibration

    move_buffers(model, torch.device("meta"))  # rotary frequencies too: one device for the whole forward
    blocks = model.get_submodule(layout.blocks_path)
    by_structure: dict[tuple, list[InputGroup]] = {}
    groups_of = []
    with FakeTensorMode(allow_non_fake_inputs=True, shape_env=ShapeEnv()), torch.no_grad():
        captured = capture_block_inputs(model, layout, torch.zeros(1, 8, dtype=torch.long, device="meta"))
        for b, block in enumerate(blocks):
            set_calibration(block, True)  # MoE: every expert sees every token, as the workers' plan step
            signature = _structure(block)
            if signature not in by_structure:
                inp = BlockInput(captured.hidden, captured.block_kwargs, block_idx=b)
                by_structure[signature] = find_input_groups(block, inp)
            groups_of.append(by_structure[signature])
    return captured.hidden.shape[-1], groups_of


def _structure(block: nn.Module) -> tuple:
    """What decides a block's input groups (as BlockWorker groups blocks): module names and classes, shapes."""
    return (tuple((name, type(mod).__name__) for name, mod in block.named_modules()),
            tuple((name, tuple(p.shape)) for name, p in block.named_parameters()))


def _embedding_weights(source: ModelSource, layout: DecoderLayout) -> int:
    """Parameters of the non-block, non-head tensors: the embedding stage every worker keeps."""
    from rayquant.storage.shard_plan import block_of_tensor

    head = set(layout.head_names)
    return sum(math.prod(info.shape) for name, info in source.tensors.items()
               if name not in head and block_of_tensor(name, layout.blocks_path, layout.n_blocks) is None)


def _kinds(shapes: list[BlockShape], groups: list[int], job: JobShape) -> tuple[BlockKind, ...]:
    """Blocks grouped by identical shape, in order of their first block; one estimate per shape."""
    members: dict[BlockShape, list[int]] = {}
    for b, shape in enumerate(shapes):
        members.setdefault(shape, []).append(b)
    return tuple(BlockKind(blocks=tuple(bs), shape=shape, input_groups=groups[bs[0]],
                           estimate=estimate_block(shape, job)) for shape, bs in members.items())


# ---- what the user sees ----------------------------------------------------------------------------------


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return str(n)


def _span(blocks: tuple[int, ...]) -> str:
    """0-2, 5 for (0, 1, 2, 5)."""
    runs: list[list[int]] = []
    for b in blocks:
        if runs and b == runs[-1][-1] + 1:
            runs[-1].append(b)
        else:
            runs.append([b])
    return ", ".join(f"{r[0]}-{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


def print_plan(plan: JobPlan, file: TextIO | None = None) -> None:
    """The plan as three tables on stdout (rich; plain text off a terminal)."""
    from rich.console import Console

    console = Console(file=file or sys.stdout, width=132, highlight=False, soft_wrap=False)
    console.print(f"{plan.name}: {plan.model} ({plan.model_type}, revision {plan.revision[:12]}), {plan.n_blocks} "
                  f"blocks, {plan.workers} workers × {'1 GPU' if plan.gpus_per_worker else 'CPU'}")
    device = "GPU" if plan.gpus_per_worker else "CPU"
    console.print(_blocks_table(plan, device))
    console.print(_memory_table(plan, device))
    console.print(_job_table(plan, device))


def _blocks_table(plan: JobPlan, device: str) -> Table:
    from rich.table import Table

    table = Table(title="per block kind (per worker)", title_justify="left")
    for column in ("blocks", "weights", "input groups", "stages", "output", f"{device} memory", "host memory",
                   "moved", "seconds (rough)"):
        table.add_column(column, justify="left" if column == "blocks" else "right")
    for kind in plan.kinds:
        e = kind.estimate
        table.add_row(_span(kind.blocks), _count(kind.shape.weights), str(kind.input_groups),
                      str(len(kind.shape.stages)), _size(kind.shape.packed_bytes), _size(e.device_memory.total),
                      _size(e.host_bytes), _size(e.traffic.total), f"{e.seconds:.2f}")
    return table


def _memory_table(plan: JobPlan, device: str) -> Table:
    """The terms of the largest per-worker device memory (jobs/sizing.MemoryEstimate)."""
    from rich.table import Table

    largest = max(plan.kinds, key=lambda k: k.estimate.device_memory.total)
    memory = largest.estimate.device_memory
    table = Table(title=f"{device} memory of one worker, block {largest.blocks[0]}", title_justify="left")
    terms = dataclasses.fields(memory)
    for term in terms:
        table.add_column(term.name.replace("_", " "), justify="right")
    table.add_row(*(_size(getattr(memory, term.name)) for term in terms))
    return table


def _job_table(plan: JobPlan, device: str) -> Table:
    from rich.table import Table

    table = Table(title="the job", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="left")
    shards = f"{plan.shards} shard{'s' if plan.shards > 1 else ''}"
    table.add_row("output", f"{shards}, {_size(plan.output_bytes)} → {plan.output_uri}")
    table.add_row("local disk", f"{_size(plan.disk_bytes)} at {plan.work_dir}")
    table.add_row(f"{device} memory per worker", _size(plan.device_memory_bytes))
    table.add_row("host memory per worker", _size(plan.host_memory_bytes))
    table.add_row("moved per worker", f"{_size(plan.bytes_moved_per_block)} per block, "
                                      f"{_size(plan.bytes_moved_total)} in all")
    references = ", ".join(sorted({k.estimate.reference for k in plan.kinds}))
    table.add_row("wall time (rough)", f"{plan.seconds / 60:.1f} min, scaled from {references} "
                                       "(README Benchmarks), uploads not included")
    return table


# ---- the command --------------------------------------------------------------------------------------------


def add_plan_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The `plan` command on the CLI's subparsers (jobs/cli.build_parser)."""
    p = subparsers.add_parser("plan", help="size a job without running it: memory, disk, traffic, time",
                              description="Dry run: read the model's config and headers, plan the output's shards "
                                          "and estimate, per worker, device and host memory, local disk, bytes "
                                          "moved per block and a rough wall time. No Ray, no GPU, no weights.")
    p.add_argument("spec", help="job spec YAML, e.g. jobs/specs/tiny-llama.yaml")
    p.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a spec field, value read as YAML (e.g. --set cluster.num_workers=8); repeatable")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object instead of tables")
    p.set_defaults(run=run_plan)
    return p


def run_plan(args: argparse.Namespace) -> int:
    """Print the plan of args.spec (with args.set) as tables or JSON; 0 on success.

    Raises:
        SpecError and the input errors of plan_job (the CLI exits 2 on them).
    """
    plan = plan_job(load_spec(Path(args.spec), args.set or []))
    if args.json:
        print(json.dumps(dataclasses.asdict(plan), sort_keys=True))
    else:
        print_plan(plan)
    return 0

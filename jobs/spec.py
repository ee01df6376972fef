"""The job spec: what to quantize, how, with which data, where the result goes.

Parsed once at the edge (CLI, scheduler, submit); cross-field rules live in validators so bad
combinations fail before any worker starts. The driver turns it into frozen dataclasses.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rayquant.jobs.loader_compat import checkpoint_settings, unreadable_problem
from rayquant.solver.valid_settings import (bits_problem, damp_increment_problem, damp_problem, group_size_problem)

MAX_SPEC_BYTES = 1 << 20  # a job spec is a few KB; anything this large is not one
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")  # safe in file names, URLs and the model card title


class SpecError(Exception):
    """The job spec is invalid; the message names the field and the fix."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSpec(_Strict):
    source: str = "synthetic://llama-tiny"  # local dir | s3://bucket/prefix | hf://org/name[@rev] | synthetic://<preset>
    # rayquant builds models from the installed transformers' own classes only and never runs code from a
    # checkpoint: true is refused (kept as a key so a spec written for other tools fails with the reason)
    trust_remote_code: bool = False

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError(
                "model.trust_remote_code=true is not supported: rayquant never runs model code from a checkpoint; "
                "it quantizes decoder-only causal LMs (…ForCausalLM) whose model_type the installed transformers "
                "knows (Llama, Mistral, Qwen2/3, Gemma, Mixtral, ...; workers/adapter.py); set "
                "model.trust_remote_code: false, or upgrade transformers to a version that ships the architecture")
        return v


class MoESpec(_Strict):
    min_tokens: int = Field(1, ge=1)  # calibration tokens an expert must be routed; fewer = starved
    # what a starved expert gets: error (stop, exit 2), calibrate_all (GPTQ on the all-token Hessian
    # every expert is calibrated with), rtn (round-to-nearest); recorded per expert in report.json
    starved_experts: Literal["error", "calibrate_all", "rtn"] = "calibrate_all"
    # whose inputs an expert's Hessians are: routed (the tokens its router sends it, as GPTQModel and
    # MoE-Quant; top-k/E of the expert compute) or all (every token through every expert; E× the compute)
    hessian_tokens: Literal["all", "routed"] = "routed"


def _checked(value, problem, prefix: str = ""):
    """value, or the solver's own rule (solver/gptq.py) as this field's error."""
    message = problem(value)
    if message is not None:
        raise ValueError(prefix + message)
    return value


class OverrideSpec(_Strict):
    """One quant.overrides rule; the first rule whose pattern matches a linear's full name wins."""

    pattern: str  # regex, matched from the start of the full module name (as GPTQModel and vLLM match)
    bits: int | None = None  # this module's bits instead of quant.bits
    group_size: int | None = None  # this module's group size instead of quant.group_size
    skip: bool = False  # leave the module unquantized (e.g. a sensitive o_proj)

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v: str) -> str:
        try:
            re.compile(v)
        except re.error as err:
            raise ValueError(f"pattern {v!r} is not a valid regular expression ({err}); fix it, "
                             r"e.g. '.*\.mlp\.down_proj'") from err
        return v

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int | None) -> int | None:
        return v if v is None else _checked(v, bits_problem)

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int | None) -> int | None:
        return v if v is None else _checked(v, group_size_problem)

    @model_validator(mode="after")
    def _changes_something(self) -> OverrideSpec:
        if self.skip and (self.bits is not None or self.group_size is not None):
            raise ValueError(f"override {self.pattern!r} sets skip together with bits/group_size; "
                             "a skipped module is not quantized: drop one of them")
        if not self.skip and self.bits is None and self.group_size is None:
            raise ValueError(f"override {self.pattern!r} changes nothing; set bits, group_size or skip: true")
        return self


class QuantSpec(_Strict):
    bits: int = 4  # 2, 3, 4 or 8; fewer bits = smaller model, larger error
    group_size: int = 128  # columns per scale/zero; -1 = one group per row (smallest, least exact)
    desc_act: bool = False  # act-order: better quality, g_idx gather at inference
    sym: bool = True  # symmetric grid (fixed zero point); asym fits skewed rows better
    static_groups: bool = False  # grids fixed before the solve; makes desc_act cheap at inference
    # group-aware act-order (GAR): solve each 128-channel group's columns, and the groups, by activation
    # size; g_idx stays sequential, so inference is as fast as without act-order. desc_act: true turns it
    # off (the resolved spec, the fingerprint and quantization_config then say false)
    act_group_aware: bool = True
    damp_percent: float = 0.01  # Hessian damping relative to mean(diag H)
    damp_auto_increment: float = 0.01  # added to damp_percent each time Cholesky fails
    true_sequential: bool = True  # re-collect Hessians after each sub-stage (qkv → o → gate/up → down)
    lm_head: bool = False  # quantize the output head too (not supported yet)
    # GPU workers' activations and block forwards: bfloat16 (fast, the models' own dtype) or float32 (the CPU
    # workers' precision: layer losses within 0.5 % of a CPU run's; ~2x activation memory, slower forwards)
    gpu_activations: Literal["bfloat16", "float32"] = "bfloat16"
    moe: MoESpec = MoESpec()  # MoE models only: what to do with experts the router starves
    # per-module rules (regex on the full module name → bits / group_size / skip), first match wins;
    # written into config.json's quantization_config.dynamic for GPTQModel and vLLM
    overrides: tuple[OverrideSpec, ...] = ()

    @field_validator("bits")
    @classmethod
    def _bits(cls, v: int) -> int:
        return _checked(v, bits_problem, "quant.")

    @field_validator("group_size")
    @classmethod
    def _group_size(cls, v: int) -> int:
        return _checked(v, group_size_problem, "quant.")

    @field_validator("damp_percent")
    @classmethod
    def _damp(cls, v: float) -> float:
        return _checked(v, damp_problem, "quant.")

    @field_validator("damp_auto_increment")
    @classmethod
    def _damp_inc(cls, v: float) -> float:
        return _checked(v, damp_increment_problem, "quant.")

    @model_validator(mode="after")
    def _one_solve_order(self) -> QuantSpec:
        if self.desc_act and self.act_group_aware:  # the documented decision: desc_act wins
            object.__setattr__(self, "act_group_aware", False)  # frozen model: set while it is being built
        return self

    @model_validator(mode="after")
    def _some_loader_reads_it(self) -> QuantSpec:
        for settings in checkpoint_settings(self):
            problem = unreadable_problem(settings)
            if problem is not None:
                raise ValueError(problem)
        return self

    @field_validator("lm_head")
    @classmethod
    def _lm_head(cls, v: bool) -> bool:
        if v:
            raise ValueError("quant.lm_head=true is not supported yet; set quant.lm_head: false")
        return v


class CalibrationSpec(_Strict):
    # builtin://text (shipped Python docs, PSF licence) | path or s3://bucket/key to .txt/.jsonl/.parquet
    # | hf://<dataset>[/<config>] from the local Hugging Face datasets cache (never downloaded)
    dataset: str = "builtin://text"
    text_field: str = "text"  # .jsonl field / .parquet or hf:// column holding the text
    split: str = "train"  # hf:// only: which cached split
    # concat: records joined with EOS, seeded random windows (GPTQ's); per_sample: each record's first seq_len
    packing: Literal["concat", "per_sample"] = "concat"
    min_length: int = Field(0, ge=0)  # records with fewer tokens are dropped before packing
    n_samples: int = Field(128, ge=1)  # calibration windows; more = better Hessians, slower
    seq_len: int = Field(2048, ge=8)  # tokens per window
    eval_samples: int = Field(16, ge=0)  # held-out windows, never used for calibration; 0 = no in-pass eval
    eval_rtn: bool = False  # also measure RTN's perplexity in the same pass (a third stream of eval windows)
    seed: int = 0  # window selection


# how long the job waits and how often it replaces a worker: not in the output's identity (the same bytes)
RUN_ONLY_CLUSTER_FIELDS = ("rendezvous_timeout_s", "collective_timeout_s", "max_worker_restarts")


class ClusterSpec(_Strict):
    address: str | None = None  # None = embedded local Ray; else a Ray cluster address (ray://host:10001)
    num_workers: int = Field(2, ge=1)  # workers; each keeps 1/num_workers of the samples
    gpus_per_worker: int = Field(0, ge=0, le=1)  # 0 = CPU workers (Gloo), 1 = one GPU each (NCCL)
    cpus_per_worker: int = Field(1, ge=1)  # torch threads per worker
    # seconds every worker waits for all of them to join the process group; longer tolerates slow starts
    rendezvous_timeout_s: int = Field(60, ge=1)
    # seconds a collective waits for its peers before failing; must outlast the slowest rank's stage
    collective_timeout_s: int = Field(1800, ge=1)
    # times one rank's worker may die and be replaced inside the job (the job then resumes from its last
    # durable block); one more death of that rank ends the job (rerun to resume)
    max_worker_restarts: int = Field(3, ge=0)


class OutputSpec(_Strict):
    # a local directory, s3://bucket[/prefix] or hf://org/name[@branch] (created private if missing)
    uri: str = "./outputs/tiny-llama-w4g128"
    # s3:// and hf:// outputs are built here and uploaded shard by shard as they close; the folder is removed
    # once the manifest is published. Default: $RAYQUANT_CACHE/outputs/<name>-<job fingerprint>
    work_dir: str | None = None
    # the directory (output.uri, or work_dir for s3:// and hf://) is a mount every Ray node sees at this path:
    # required with cluster.address, because workers write the shards themselves (embedded Ray: one node)
    shared: bool = False
    # shards hold whole blocks up to this size (a larger block gets one of its own); the files change, the
    # tensors do not. HF's save_pretrained default is 5 GB; smaller shards upload and retry in smaller steps
    max_shard_bytes: int = Field(4 * 2**30, ge=1)
    # how a rerun checks a finished output before reporting it complete: sizes (instant) or sizes and sha256
    # (about 0.75 s per GB read); a damaged output is refused either way, hashes also catch flipped bytes
    verify: Literal["sizes", "hashes"] = "hashes"

    @field_validator("uri")
    @classmethod
    def _uri(cls, v: str) -> str:
        scheme, sep, rest = v.partition("://")
        if not sep:
            return v
        if scheme == "s3" and rest.split("/", 1)[0]:
            return v.rstrip("/")
        repo = rest.partition("@")[0]
        if scheme == "hf" and len(repo.split("/")) == 2 and all(repo.split("/")):
            return v
        raise ValueError(
            f"output.uri={v!r}: use a local directory, s3://bucket[/prefix] or hf://org/name[@branch]")

    @property
    def remote(self) -> bool:
        return "://" in self.uri


class JobSpec(_Strict):
    name: str = "tiny-llama-w4g128"
    model: ModelSpec = ModelSpec()
    quant: QuantSpec = QuantSpec()
    calibration: CalibrationSpec = CalibrationSpec()
    cluster: ClusterSpec = ClusterSpec()
    output: OutputSpec = OutputSpec()

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if NAME_PATTERN.fullmatch(v) is None:
            raise ValueError(f"name={v[:120]!r}: use 1-100 letters, digits, '.', '_' or '-', starting with a letter "
                             "or digit (it names files and titles the model card), e.g. llama-3-8b-w4g128")
        return v

    @model_validator(mode="after")
    def _samples_cover_workers(self) -> JobSpec:
        if self.calibration.n_samples < self.cluster.num_workers:
            raise ValueError(
                f"calibration.n_samples={self.calibration.n_samples} is smaller than "
                f"cluster.num_workers={self.cluster.num_workers}: every worker needs at least one "
                "sample; raise calibration.n_samples or lower cluster.num_workers"
            )
        return self

    @model_validator(mode="after")
    def _remote_workers_reach_the_output(self) -> JobSpec:
        if self.cluster.address is None:
            return self
        if self.output.remote:
            if self.output.shared and self.output.work_dir is not None:
                return self
            raise ValueError(
                f"cluster.address={self.cluster.address!r} with output.uri={self.output.uri!r}: the workers write "
                "the shards into output.work_dir before they are uploaded, and a folder of this machine is not "
                "theirs; set output.work_dir to a mount every Ray node sees at that path and output.shared: true, "
                "or run without cluster.address")
        if self.output.shared:
            return self
        raise ValueError(
            f"cluster.address={self.cluster.address!r} with output.uri={self.output.uri!r}: the workers write "
            "the shards, and a local directory of this machine is not theirs; set output.shared: true if "
            "output.uri is a mount every Ray node sees at that path, or run without cluster.address"
        )

    def resolved(self) -> dict:
        """The spec with defaults filled in, minus where it runs and writes and how long it waits (not part of
        the output)."""
        body = self.model_dump(mode="json")
        body.pop("output")
        for how_it_runs in ("address", *RUN_ONLY_CLUSTER_FIELDS):
            body["cluster"].pop(how_it_runs)
        return body

    def fingerprint(self, source_revision: str) -> str:
        """Identity of the job's output: everything that changes the bytes, not where they go."""
        body = self.resolved()
        body["source_revision"] = source_revision
        return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


class _RefusedYAML(yaml.YAMLError):
    """YAML that is valid but not accepted in a job spec (an alias, an anchor, a repeated key)."""


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader without anchors and aliases (a few hundred bytes of aliases expand to gigabytes once the
    spec is copied; a spec has no use for them) and without repeated keys (YAML keeps the last silently)."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _RefusedYAML(f"line {event.start_mark.line + 1}: YAML anchors and aliases (&name, *name, <<:) "
                               "are not allowed in a job spec; write the values out")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen: set[Hashable] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):
                continue  # SafeLoader refuses it below with its own message
            if key in seen:
                raise _RefusedYAML(f"line {key_node.start_mark.line + 1}: key {key!r} appears twice in one "
                                   "section; keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def parse_spec_yaml(text: str) -> Any:
    """YAML as a SafeLoader reads it, refusing anchors, aliases and repeated keys.

    Raises:
        yaml.YAMLError: the text is not YAML, or uses what a spec refuses (the message names the line).
    """
    return yaml.load(text, Loader=_SpecLoader)  # a SafeLoader: no Python objects


def parse_override(item: str) -> tuple[list[str], Any]:
    """`quant.bits=8` -> (["quant", "bits"], 8); the value is read as YAML (no anchors or aliases).

    Raises:
        SpecError: the item has no `=`, or its value is not acceptable YAML.
    """
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise SpecError(f"--set {item!r}: expected key.path=value, e.g. --set quant.bits=8")
    try:
        return key.split("."), parse_spec_yaml(raw)
    except yaml.YAMLError as err:
        raise SpecError(f"--set {item[:200]!r}: the value is not acceptable YAML ({err}); quote it or fix it") from err


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Return a copy of the raw spec dict with every `--set` applied."""
    out = copy.deepcopy(data)  # the loader refuses aliases, so the copy is as large as the file
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise SpecError(f"--set {item!r}: {part} is not a section of the spec")
        node[path[-1]] = value
    return out


def _yaml_problem(err: yaml.YAMLError) -> str:
    """PyYAML's error on one line: the problem and where (its own text quotes the line under a caret)."""
    if not isinstance(err, yaml.MarkedYAMLError) or err.problem is None:
        return " ".join(str(err).split())

    def at(mark) -> str:
        return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""

    context = f" ({err.context}{at(err.context_mark)})" if err.context else ""
    return f"{err.problem}{at(err.problem_mark)}{context}"


def read_spec_file(path: Path) -> dict:
    """The raw mapping in a YAML job spec file.

    Raises:
        SpecError: the file is missing, unreadable, not a text file, too large, not YAML, or not a mapping;
            or it uses anchors/aliases or repeats a key.
    """
    fix = "pass the path of a job spec YAML (`rayquant example-spec` prints one)"
    try:
        with Path(path).open("rb") as f:
            raw = f.read(MAX_SPEC_BYTES + 1)  # bounded: /dev/zero or a model file is not read whole
    except FileNotFoundError as err:
        raise SpecError(f"spec file {path} does not exist; {fix}") from err
    except IsADirectoryError as err:
        raise SpecError(f"spec file {path} is a directory; {fix}") from err
    except OSError as err:  # permissions, a broken link, an unreadable device
        raise SpecError(f"spec file {path} cannot be read ({err.strerror or err}); check its permissions or "
                        f"{fix}") from err
    if len(raw) > MAX_SPEC_BYTES:
        raise SpecError(f"spec file {path} is larger than any job spec ({MAX_SPEC_BYTES} bytes); {fix}")
    try:
        data = parse_spec_yaml(raw.decode("utf-8")) or {}
    except UnicodeDecodeError as err:
        raise SpecError(f"spec file {path} is not UTF-8 text (byte {err.start} is {raw[err.start]:#04x}): it is "
                        f"not a job spec; {fix}") from err
    except _RefusedYAML as err:
        raise SpecError(f"spec file {path}, {err}") from err
    except yaml.YAMLError as err:
        raise SpecError(f"spec file {path} is not valid YAML: {_yaml_problem(err)}; fix the YAML there") from err
    if not isinstance(data, dict):
        raise SpecError(f"spec file {path} must hold a mapping of sections (name, model, quant, ...)")
    return data


def load_spec(path: Path | None, overrides: list[str] = ()) -> JobSpec:
    """Read a YAML job spec, apply `--set` overrides, validate.

    Raises:
        SpecError: the file is missing, unreadable or not YAML, or a field is unknown or invalid.
    """
    data = read_spec_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    try:
        return JobSpec.model_validate(data)
    except ValidationError as err:
        raise SpecError(describe_validation_error(err)) from err


def describe_validation_error(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "spec"
        if e["type"] == "extra_forbidden":
            lines.append(f"{where}: unknown key; remove it or check its spelling against jobs/specs/tiny-llama.yaml")
        else:
            lines.append(f"{where}: {e['msg'].removeprefix('Value error, ')}")
    return "invalid job spec: " + "; ".join(lines)

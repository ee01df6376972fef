"""The job's records that outlive a worker: what is written into the output and read back.

`LayerReport` (one quantized linear), `BlockStats` (what one run measured for one block), `BlockMarker`
(a block's staging marker: its layers and stats), `EvalReport`, `QuantizationConfig`, `JobReport`
(report.json) and `RunStats` (run-stats.json). `to_json()` gives the JSON object the file holds (keys
are sorted when written, DESIGN.md §9); `from_json()` reads one back, checking every field's type, and
raises `MalformedRecord` naming the field. Torch-free: the driver, the staging area and the model card
read them without the solver.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import MISSING, asdict, dataclass, fields, replace
from typing import Any


CHECKPOINT_FORMAT = "gptq"  # GPTQ v1: zero points stored minus one (DESIGN.md §10)


class MalformedRecord(ValueError):
    """A JSON object read back from the output does not hold the record it should (a damaged file)."""


@dataclass(frozen=True)
class LayerReport:
    """What one quantized linear reports: a worker makes it; markers and report.json keep it."""

    name: str  # full tensor prefix, e.g. model.layers.3.mlp.down_proj
    input_group: str
    in_features: int
    out_features: int
    gptq_loss: float
    rtn_loss: float
    damp_percent: float
    n_tokens: int
    owner: int  # the rank that solved every row; -1: rows split over all ranks (workers/row_split.py)
    max_rel_err: float
    mean_rel_err: float
    routed_tokens: int | None = None  # MoE experts: calibration tokens the router sent it (all ranks)
    starved_policy: str | None = None  # MoE experts below quant.moe.min_tokens: the policy applied to it

    def to_json(self) -> dict:
        return asdict(self)  # every field, None ones as null

    @classmethod
    def from_json(cls, data: object, where: str = "layer") -> LayerReport:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        return cls(**_read_fields(cls, data, where))


@dataclass(frozen=True)
class BlockStats:
    """What this run measured for one block: not part of the output's bytes (run-stats.json)."""

    block: int
    seconds: dict[str, float]  # per stage, the slowest rank's; `persist` added once the block is durable
    peak_memory_bytes: tuple[int, ...]  # per rank (GPU: peak allocated in the block; CPU: process peak RSS)
    bytes_received: tuple[dict[str, int], ...]  # per rank, per stage

    def with_persist(self, seconds: float) -> BlockStats:
        """These stats plus the seconds rank 0's writer took to make the block durable."""
        return replace(self, seconds={**self.seconds, "persist": seconds})

    def to_json(self) -> dict:
        return {"block": self.block, "seconds": dict(self.seconds), "peak_memory_bytes": list(self.peak_memory_bytes),
                "bytes_received": [dict(received) for received in self.bytes_received]}

    @classmethod
    def from_json(cls, data: object, where: str = "stats") -> BlockStats:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        return cls(**_read_fields(cls, data, where, {
            "seconds": _map_of(_is_number, "number"),
            "peak_memory_bytes": _list_of(_scalar(_is_int, "int")),
            "bytes_received": _list_of(_map_of(_is_int, "int")),
        }))


@dataclass(frozen=True)
class BlockMarker:
    """block-NNNNN.done in the staging area: the block is durable in its shard; its records for resume."""

    block_idx: int
    layers: tuple[LayerReport, ...]
    stats: BlockStats

    def to_json(self) -> dict:
        return {"block_idx": self.block_idx, "layers": [layer.to_json() for layer in self.layers],
                "stats": self.stats.to_json()}

    @classmethod
    def from_json(cls, data: object, where: str = "marker") -> BlockMarker:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        return cls(**_read_fields(cls, data, where, {"layers": _list_of(LayerReport.from_json),
                                                     "stats": BlockStats.from_json}))


@dataclass(frozen=True)
class EvalReport:
    """Perplexities of the held-out windows, measured in the quantization pass (report.json `eval`)."""

    fp_ppl: float
    gptq_ppl: float
    ppl_delta: float  # gptq_ppl - fp_ppl
    n_windows: int
    seq_len: int
    n_tokens: int  # tokens predicted over all windows and ranks
    windows_sha256: str  # of the eval windows as contiguous int64 bytes
    rtn_ppl: float | None = None  # with calibration.eval_rtn only

    def perplexities(self) -> dict[str, float]:
        """fp_ppl, gptq_ppl and (if measured) rtn_ppl."""
        return {k: v for k, v in self.to_json().items() if k.endswith("_ppl")}

    def metrics(self) -> dict[str, float]:
        """report.json `metrics`: the perplexities and their delta."""
        return {**self.perplexities(), "ppl_delta": self.ppl_delta}

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if not (k == "rtn_ppl" and v is None)}

    @classmethod
    def from_json(cls, data: object, where: str = "eval") -> EvalReport:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        return cls(**_read_fields(cls, data, where))


@dataclass(frozen=True)
class DatasetDescription:
    source: str  # calibration.dataset as given
    kind: str  # builtin | txt | jsonl | parquet | hf
    packing: str  # concat | per_sample
    min_length: int
    records_used: int  # calibration records that windows were cut from
    records_dropped: int  # calibration records with fewer than max(min_length, 1) tokens
    records_held_out: int  # records (or running texts) the eval windows come from

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object, where: str = "calibration_dataset") -> DatasetDescription:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        return cls(**_read_fields(cls, data, where))


@dataclass(frozen=True)
class QuantizationConfig:
    """config.json's `quantization_config` of a GPTQ v1 checkpoint (DESIGN.md §10); also report.json's
    `quantization`. Build it with finished_checkpoint.gptq_quantization_config."""

    bits: int
    group_size: int
    desc_act: bool
    sym: bool
    damp_percent: float
    true_sequential: bool
    static_groups: bool
    act_group_aware: bool  # GPTQModel's name for group-aware act-order: the solve order only
    quantizer: str  # meta.quantizer: "rayquant:<version>"
    dynamic: dict[str, dict] | None = None  # GPTQModel's per-module map ("+:regex" → fields, "-:regex" → skip)

    def to_json(self) -> dict:
        config = {k: v for k, v in asdict(self).items() if k not in ("quantizer", "dynamic")}
        config.update(quant_method="gptq", checkpoint_format=CHECKPOINT_FORMAT, meta={"quantizer": [self.quantizer]})
        if self.dynamic:  # only with overrides: checkpoints without them keep exactly the base keys
            config["dynamic"] = self.dynamic
        return config

    @classmethod
    def from_json(cls, data: object, where: str = "quantization_config") -> QuantizationConfig:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        data = _object(data, where)
        for key, expected in (("quant_method", "gptq"), ("checkpoint_format", CHECKPOINT_FORMAT)):
            if data.get(key) != expected:
                raise MalformedRecord(f"{where}.{key}: expected {expected!r}, got {data.get(key)!r}")
        meta = _object(data.get("meta"), f"{where}.meta")
        quantizer = meta.get("quantizer")
        if set(meta) != {"quantizer"} or not (isinstance(quantizer, list) and len(quantizer) == 1):
            raise MalformedRecord(f"{where}.meta: expected {{'quantizer': [one tag]}}, got {meta!r}")
        fields_ = {k: v for k, v in data.items() if k not in ("quant_method", "checkpoint_format", "meta")}
        return cls(**_read_fields(cls, {**fields_, "quantizer": quantizer[0]}, where,
                                  {"dynamic": _map_of(lambda v: isinstance(v, dict), "object")}))


@dataclass(frozen=True)
class JobReport:
    """report.json: what was quantized from what, how well (DESIGN.md §9)."""

    job: str  # the spec's name
    source_revision: str
    calibration_dataset: DatasetDescription
    calibration_windows_sha256: str  # of all calibration windows as contiguous int64 bytes
    calibration_window_sha256s: tuple[str, ...]  # one per window, in sample order
    quantization: QuantizationConfig
    layers: tuple[LayerReport, ...]  # sorted by name
    eval: EvalReport | None = None  # with calibration.eval_samples > 0; also gives `metrics`

    def to_json(self) -> dict:
        report = {
            "job": self.job,
            "source_revision": self.source_revision,
            "calibration_dataset": self.calibration_dataset.to_json(),
            "calibration_windows_sha256": self.calibration_windows_sha256,
            "calibration_window_sha256s": list(self.calibration_window_sha256s),
            "quantization": self.quantization.to_json(),
            "layers": [layer.to_json() for layer in self.layers],
        }
        if self.eval is not None:
            report["eval"] = self.eval.to_json()
            report["metrics"] = self.eval.metrics()
        return report

    @classmethod
    def from_json(cls, data: object, where: str = "report") -> JobReport:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        data = dict(_object(data, where))
        metrics = data.pop("metrics", None)
        report = cls(**_read_fields(cls, data, where, {
            "calibration_dataset": DatasetDescription.from_json,
            "calibration_window_sha256s": _list_of(_scalar(lambda v: isinstance(v, str), "str")),
            "quantization": QuantizationConfig.from_json,
            "layers": _list_of(LayerReport.from_json),
            "eval": EvalReport.from_json,
        }))
        expected = report.eval.metrics() if report.eval is not None else None
        if metrics != expected:
            raise MalformedRecord(f"{where}.metrics: expected {expected!r} (from eval), got {metrics!r}")
        return report


@dataclass(frozen=True)
class RunStats:
    """run-stats.json: this run's seconds and memory; the one output file outside the manifest."""

    job_id: str  # random per run
    workers: int
    blocks: tuple[BlockStats, ...]  # a replayed block keeps the stats of the run that quantized it
    eval_seconds: float

    def to_json(self) -> dict:
        return {"job_id": self.job_id, "workers": self.workers, "blocks": [b.to_json() for b in self.blocks],
                "eval_seconds": self.eval_seconds}

    @classmethod
    def from_json(cls, data: object, where: str = "run_stats") -> RunStats:
        """The record in a parsed JSON object; MalformedRecord names what is missing, unknown or mistyped."""
        return cls(**_read_fields(cls, data, where, {"blocks": _list_of(BlockStats.from_json)}))


# --- reading JSON back ---------------------------------------------------------------------------

_Read = Callable[[object, str], Any]  # (JSON value, where it is) -> the checked value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_SCALARS: dict[str, Callable[[object], bool]] = {
    "int": _is_int, "float": _is_number, "bool": lambda v: isinstance(v, bool), "str": lambda v: isinstance(v, str),
}


def _read_fields(cls: type, data: object, where: str, nested: dict[str, _Read] | None = None) -> dict:
    """cls's fields from a JSON object: scalars checked against their annotation (`int`, `float`, `bool`,
    `str`, each optionally `| None`), the others through `nested`; a field with a default may be absent."""
    data = _object(data, where)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise MalformedRecord(f"{where}: unknown field {unknown[0]!r} (expected {sorted(names)})")
    values = {}
    for f in fields(cls):
        if f.name not in data:
            if f.default is MISSING:
                raise MalformedRecord(f"{where}: missing field {f.name!r}")
            continue
        value, kind = data[f.name], f.type.removesuffix(" | None")
        if value is None and kind != f.type:
            values[f.name] = None
        elif nested is not None and f.name in nested:
            values[f.name] = nested[f.name](value, f"{where}.{f.name}")
        else:
            values[f.name] = _scalar(_SCALARS[kind], kind)(value, f"{where}.{f.name}")
    return values


def _object(data: object, where: str) -> dict:
    if not isinstance(data, dict):
        raise MalformedRecord(f"{where}: expected a JSON object, got {_shown(data)}")
    return data


def _scalar(check: Callable[[object], bool], kind: str) -> _Read:
    def read(value: object, where: str) -> object:
        if not check(value):
            raise MalformedRecord(f"{where}: expected {kind}, got {_shown(value)}")
        return value
    return read


def _list_of(read_item: _Read) -> _Read:
    def read(value: object, where: str) -> tuple:
        if not isinstance(value, list):
            raise MalformedRecord(f"{where}: expected a list, got {_shown(value)}")
        return tuple(read_item(item, f"{where}[{i}]") for i, item in enumerate(value))
    return read


def _map_of(check: Callable[[object], bool], kind: str) -> _Read:
    def read(value: object, where: str) -> dict:
        for key, item in _object(value, where).items():
            _scalar(check, kind)(item, f"{where}.{key}")
        return dict(value)
    return read


def _shown(value: object) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}{'…' if len(text) > 60 else ''}"

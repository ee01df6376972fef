"""The records written into the output read back equal, and damaged JSON is refused naming the field."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from rayquant.storage.finished_checkpoint import gptq_quantization_config
from rayquant.storage.job_records import (BlockMarker, BlockStats, DatasetDescription, EvalReport, JobReport,
                                          LayerReport, MalformedRecord, RunStats)

EXPERT = LayerReport(name="model.layers.0.block_sparse_moe.experts.3.w1", input_group="experts.3.w1", in_features=64,
                     out_features=128, gptq_loss=0.25, rtn_loss=1.0, damp_percent=0.02, n_tokens=4096, owner=-1,
                     max_rel_err=3e-7, mean_rel_err=1e-7, routed_tokens=12, starved_policy="calibrate_all")
DENSE = LayerReport(name="model.layers.0.mlp.down_proj", input_group="mlp.down_proj", in_features=128, out_features=64,
                    gptq_loss=7.5e-05, rtn_loss=1, damp_percent=0.01, n_tokens=8192, owner=1, max_rel_err=0.0,
                    mean_rel_err=0.0)
STATS = BlockStats(block=0, seconds={"solve": 0.21, "persist": 0.0027}, peak_memory_bytes=(554864640, 556273664),
                   bytes_received=({"load": 147712, "reduce": 917536}, {"share": 42736}))
EVAL = EvalReport(fp_ppl=1042.9, gptq_ppl=1043.7, ppl_delta=0.8, n_windows=8, seq_len=256, n_tokens=2040,
                  windows_sha256="5" * 64, rtn_ppl=1050.0)
QUANT = gptq_quantization_config(bits=4, group_size=128, desc_act=False, sym=True, damp_percent=0.01,
                                 true_sequential=True, static_groups=False, act_group_aware=True,
                                 dynamic={"+:.*down_proj": {"bits": 8}, "-:.*o_proj": {}})
REPORT = JobReport(
    job="tiny", source_revision="6" * 64,
    calibration_dataset=DatasetDescription(source="builtin://text", kind="builtin", packing="concat", min_length=0,
                                           records_used=1, records_dropped=0, records_held_out=1),
    calibration_windows_sha256="7" * 64, calibration_window_sha256s=("8" * 64, "9" * 64),
    quantization=QUANT, layers=(EXPERT, DENSE), eval=EVAL,
)
RECORDS = [EXPERT, DENSE, STATS, EVAL, QUANT, REPORT, BlockMarker(block_idx=0, layers=(DENSE,), stats=STATS),
           RunStats(job_id="j1", workers=2, blocks=(STATS,), eval_seconds=0.06)]


def _through_file(data: dict) -> dict:
    return json.loads(json.dumps(data, indent=2, sort_keys=True))


@pytest.mark.parametrize("record", RECORDS, ids=lambda r: type(r).__name__)
def test_every_record_reads_back_equal_from_its_json(record):
    data = _through_file(record.to_json())
    assert data == record.to_json()
    assert type(record).from_json(data) == record


def test_quantization_config_has_the_checkpoints_keys_and_dynamic_only_with_overrides():
    assert QUANT.to_json() == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True, "damp_percent": 0.01,
        "true_sequential": True, "static_groups": False, "act_group_aware": True, "checkpoint_format": "gptq",
        "meta": {"quantizer": ["rayquant:0.1.0"]}, "dynamic": {"+:.*down_proj": {"bits": 8}, "-:.*o_proj": {}},
    }
    plain = gptq_quantization_config(bits=4, group_size=128, desc_act=False, sym=True, damp_percent=0.01,
                                     true_sequential=True, static_groups=False, dynamic={})
    assert plain.dynamic is None and "dynamic" not in plain.to_json()


def test_report_without_eval_has_neither_eval_nor_metrics_and_rtn_ppl_appears_only_when_measured():
    report = replace(REPORT, eval=None)
    assert {"eval", "metrics"}.isdisjoint(report.to_json())
    assert JobReport.from_json(_through_file(report.to_json())) == report
    no_rtn = replace(EVAL, rtn_ppl=None)
    assert "rtn_ppl" not in no_rtn.to_json()
    assert no_rtn.metrics() == {"fp_ppl": 1042.9, "gptq_ppl": 1043.7, "ppl_delta": 0.8}
    assert REPORT.to_json()["metrics"] == {"fp_ppl": 1042.9, "gptq_ppl": 1043.7, "rtn_ppl": 1050.0, "ppl_delta": 0.8}


def _damaged(record, path: tuple, value) -> dict:
    data = _through_file(record.to_json())
    *parents, key = path
    target = data
    for part in parents:
        target = target[part]
    if value is KeyError:
        del target[key]
    else:
        target[key] = value
    return data


@pytest.mark.parametrize(("record", "path", "value", "named"), [
    (DENSE, ("n_tokens",), KeyError, "layer: missing field 'n_tokens'"),
    (DENSE, ("n_tokens",), True, "layer.n_tokens: expected int, got bool True"),
    (DENSE, ("gptq_loss",), "0.5", "layer.gptq_loss: expected float, got str '0.5'"),
    (DENSE, ("routed_tokens",), 1.5, "layer.routed_tokens: expected int, got float 1.5"),
    (DENSE, ("loss",), 0.5, "layer: unknown field 'loss'"),
    (STATS, ("peak_memory_bytes", 1), None, "stats.peak_memory_bytes[1]: expected int, got NoneType None"),
    (STATS, ("bytes_received",), {"load": 1}, "stats.bytes_received: expected a list, got dict"),
    (STATS, ("seconds", "solve"), [0.2], "stats.seconds.solve: expected number, got list [0.2]"),
    (REPORT, ("layers", 1, "name"), 7, "report.layers[1].name: expected str, got int 7"),
    (REPORT, ("quantization", "checkpoint_format"), "gptq_v2",
     "report.quantization.checkpoint_format: expected 'gptq', got 'gptq_v2'"),
    (REPORT, ("quantization", "meta", "quantizer"), [], "report.quantization.meta: expected {'quantizer': [one tag]}"),
    (REPORT, ("metrics", "gptq_ppl"), 1.0, "report.metrics: expected {'fp_ppl': 1042.9"),
    (REPORT, ("calibration_dataset",), "builtin://text", "report.calibration_dataset: expected a JSON object, got str"),
    (REPORT, ("eval", "n_windows"), KeyError, "report.eval: missing field 'n_windows'"),
], ids=lambda v: v if isinstance(v, str) and " " not in v else None)
def test_damaged_json_is_refused_naming_the_field(record, path, value, named):
    with pytest.raises(MalformedRecord) as err:
        type(record).from_json(_damaged(record, path, value))
    assert named in str(err.value)


def test_with_persist_adds_the_writers_seconds_and_leaves_the_record_unchanged():
    persisted = STATS.with_persist(0.5)
    assert persisted.seconds == {"solve": 0.21, "persist": 0.5} and STATS.seconds["persist"] == 0.0027
    assert persisted.peak_memory_bytes == STATS.peak_memory_bytes

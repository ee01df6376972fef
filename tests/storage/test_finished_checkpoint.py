"""The finish of a staged checkpoint on real safetensors files: shards, index, config, report, model card, manifest."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayquant.storage.finished_checkpoint import finish_checkpoint
from rayquant.storage.job_records import JobReport, RunStats
from rayquant.storage.model_source import ModelSource, open_model_source, read_source_tensor
from rayquant.storage.output_layout import MANIFEST_FILE, STAGING
from rayquant.storage.shard_plan import DEFAULT_MAX_SHARD_BYTES
from rayquant.storage.staging import OutputState, StagingIncomplete, begin_staging, inspect_output

from .staged_output import (AUX, FINGERPRINT, HIDDEN, N_BLOCKS, QUANT_CONFIG, SMALL_SHARDS, SPEC, VOCAB, block_part,
                            block_stats, files_bytes, finish, finished_reference, plan_of, report_of,
                            stage_all_blocks, write_block)


def _expected_checkpoint_tensors(source: ModelSource) -> dict[str, torch.Tensor]:
    """Block tensors as the workers wrote them, every other tensor as in the source."""
    parts = {name: t for b in range(N_BLOCKS) for name, t in block_part(b).items()}
    rest = {name: read_source_tensor(source, name) for name in source.tensors if not name.startswith("model.layers.")}
    return {**parts, **rest}


@pytest.mark.parametrize("max_shard_bytes", [1000, SMALL_SHARDS, DEFAULT_MAX_SHARD_BYTES])
def test_finished_checkpoint_holds_every_block_in_exactly_one_shard(tmp_path: Path, source, max_shard_bytes):
    out = tmp_path / "out"
    plan = plan_of(source, max_shard_bytes)
    stage_all_blocks(out, plan)
    finish(out, source, plan)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for b in range(N_BLOCKS):
        shards = {index["weight_map"][name] for name in block_part(b)}
        assert shards == {plan.shard_of_block(b).name}, b
    in_files = [name for shard in plan.shards for name in load_file(out / shard.name)]
    assert sorted(in_files) == sorted(_expected_checkpoint_tensors(source))  # each tensor in one file, once


def test_finished_checkpoint_holds_block_and_source_tensors_in_save_file_shards(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    stage_all_blocks(out, plan)
    files = finish(out, source, plan)

    expected = _expected_checkpoint_tensors(source)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    n_shards = len(plan.shards)
    assert sorted(set(index["weight_map"].values())) == [
        f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)
    ]
    assert index["weight_map"] == plan.weight_map() and sorted(index["weight_map"]) == sorted(expected)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    for shard in plan.shards:
        loaded = load_file(out / shard.name)
        assert all(index["weight_map"][name] == shard.name for name in loaded)
        for name, tensor in loaded.items():
            assert tensor.dtype == expected[name].dtype and torch.equal(tensor, expected[name]), name
        # each shard is the file save_file writes for its tensors
        reference = tmp_path / f"save_file-{shard.name}"
        save_file(loaded, reference, metadata={"format": "pt"})
        assert (out / shard.name).read_bytes() == reference.read_bytes(), shard.name
    # model_source reads the output like any model: index and shards agree
    reopened = open_model_source(str(out))
    assert torch.equal(read_source_tensor(reopened, "lm_head.weight"), read_source_tensor(source, "lm_head.weight"))
    assert torch.equal(read_source_tensor(reopened, "model.layers.2.self_attn.q_proj.qweight"),
                       block_part(2)["model.layers.2.self_attn.q_proj.qweight"])

    assert files[-1] == MANIFEST_FILE and files[:-1] == sorted(files[:-1])
    assert set(files) == {p.name for p in out.iterdir()} and not (out / STAGING).exists()


def test_non_block_tensor_larger_than_max_shard_bytes_gets_a_shard_of_its_own(tmp_path: Path, source):
    out = tmp_path / "out"
    embed_bytes = VOCAB * HIDDEN * 2
    plan = plan_of(source, embed_bytes - 1)
    stage_all_blocks(out, plan)
    finish(out, source, plan)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    embed_shard = index["weight_map"]["model.embed_tokens.weight"]
    assert [n for n, f in index["weight_map"].items() if f == embed_shard] == ["model.embed_tokens.weight"]
    assert list(load_file(out / embed_shard)) == ["model.embed_tokens.weight"]


def test_config_aux_files_report_and_model_card(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = plan_of(source)
    stage_all_blocks(out, plan)
    finish(out, source, plan)
    config = json.loads((out / "config.json").read_text())
    assert config == {**source.config, "quantization_config": QUANT_CONFIG.to_json()}
    assert config["dtype"] == "bfloat16"
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "act_group_aware": False,
        "checkpoint_format": "gptq", "meta": {"quantizer": ["rayquant:0.1.0"]},
    }
    for name, data in AUX.items():
        assert (out / name).read_bytes() == data
    report = json.loads((out / "report.json").read_text())
    assert report == report_of(source).to_json() and JobReport.from_json(report) == report_of(source)
    assert report["metrics"] == {"fp_ppl": 11.25, "gptq_ppl": 11.5, "ppl_delta": 0.25}
    card = (out / "README.md").read_text()
    assert "| model.layers.1.mlp.down_proj | 1.5 | 3 | 0.5000 | 0.01 |" in card
    assert "| model.layers.0.self_attn.q_proj | 0.5 | 2 | 0.2500 | 0.01 |" in card
    assert "| gptq_ppl | 11.5 |" in card and "Perplexity on 2 held-out windows of 16 tokens" in card
    assert "| 512 | 2.5e-07 |" in card and "written by rayquant:0.1.0" in card
    assert "`/models/tiny`" in card and f"`{source.revision[:12]}`" in card


def test_manifest_lists_every_other_file_with_its_sha256_and_size(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    stage_all_blocks(out, plan)
    run_stats = RunStats(job_id="j1", workers=2, blocks=(block_stats(0), block_stats(1)), eval_seconds=0.5)
    finish_checkpoint(out, source, plan, report_of(source), SPEC, run_stats=run_stats)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["job_fingerprint"] == FINGERPRINT and manifest["n_blocks"] == N_BLOCKS
    assert manifest["resolved_spec"] == SPEC and manifest["source_revision"] == source.revision
    listed = {entry["path"]: entry for entry in manifest["files"]}
    # run-stats.json records this run, not the model: the one file the manifest leaves out
    assert set(listed) == {p.name for p in out.iterdir()} - {MANIFEST_FILE, "run-stats.json"}
    assert RunStats.from_json(json.loads((out / "run-stats.json").read_text())) == run_stats
    for name, entry in listed.items():
        data = (out / name).read_bytes()
        assert entry == {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_identical_inputs_give_byte_identical_checkpoints_also_over_stale_files(tmp_path: Path, source):
    plan = plan_of(source, SMALL_SHARDS)
    reference = finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    stage_all_blocks(out, plan)
    # an earlier attempt under another shard size died after writing a shard and the config
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    (out / "config.json").write_text("{}")
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=N_BLOCKS)
    finish(out, source, plan)
    assert files_bytes(out) == reference


def test_finish_interrupted_after_the_shards_closed_gives_byte_identical_files_when_rerun(tmp_path: Path, source):
    plan = plan_of(source, SMALL_SHARDS)
    reference = finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    stage_all_blocks(out, plan)
    # README.md cannot be written over a directory: the finish stops after shards, index, config, aux
    (out / "README.md").mkdir()
    with pytest.raises(OSError):
        finish(out, source, plan)
    assert all((out / shard.name).is_file() for shard in plan.shards)
    assert (out / "config.json").is_file() and not (out / MANIFEST_FILE).exists()
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=N_BLOCKS)
    (out / "README.md").rmdir()
    finish(out, source, plan)
    assert files_bytes(out) == reference


def test_finish_before_every_block_is_marked_names_the_resume_block(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    write_block(out, plan, 0)
    write_block(out, plan, 1)
    with pytest.raises(StagingIncomplete) as err:
        finish(out, source, plan)
    assert "block 2 of 3 has no marker" in str(err.value) and "resume from block 2" in str(err.value)
    assert not (out / MANIFEST_FILE).exists() and (out / STAGING).is_dir()


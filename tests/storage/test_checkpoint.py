"""Staging, markers, planned shards, resume and the finish of a checkpoint, on real safetensors files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayquant.solver.pack import PACKED_FIELDS, packed_shapes
from rayquant.storage.checkpoint import (
    MANIFEST_FILE,
    STAGING,
    OutputConflict,
    OutputState,
    StagingIncomplete,
    begin_staging,
    close_shard,
    discard_staging,
    finish_checkpoint,
    gptq_quantization_config,
    inspect_output,
    mark_block_done,
    open_shard_path,
    read_block_layers,
    read_block_stats,
    resume_point,
)
from rayquant.storage.model_source import ModelSource, open_model_source, read_source_tensor
from rayquant.storage.safetensors_reader import DTYPES
from rayquant.storage.shard_files import prepare_shard, write_shard_tensors
from rayquant.storage.shard_plan import DEFAULT_MAX_SHARD_BYTES, PlannedShard, PlannedTensor, ShardPlan, plan_shards

N_BLOCKS = 3
HIDDEN, VOCAB = 32, 64
BITS, GROUP_SIZE = 4, 16
QUANTIZED = ("self_attn.q_proj", "mlp.down_proj")
FINGERPRINT = "f" * 64
SPEC = {"name": "tiny-w4g16", "model": {"source": "/models/tiny"}, "quant": {"bits": BITS, "group_size": GROUP_SIZE}}
QUANT_CONFIG = gptq_quantization_config(
    bits=BITS, group_size=GROUP_SIZE, desc_act=False, sym=True, damp_percent=0.01, true_sequential=True,
    static_groups=False,
)
REPORT = {
    "layers": [
        {"name": f"model.layers.{b}.{layer}", "gptq_loss": 0.5 + b, "rtn_loss": 2.0 + b, "damp_percent": 0.01}
        for b in range(N_BLOCKS)
        for layer in QUANTIZED
    ],
    "metrics": {"perplexity_fp": 11.25, "perplexity_quantized": 11.5},
}
AUX = {"tokenizer.json": b'{"version": "1.0"}\n', "generation_config.json": b'{"bos_token_id": 0}\n'}
# one block is 2528 bytes, embed_tokens and lm_head 4096 each: blocks 0-1 share the first shard,
# block 2 has its own, the non-block tensors two more
SMALL_SHARDS = 6000
_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}


def _source_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    tensors = {
        "model.embed_tokens.weight": torch.randn(VOCAB, HIDDEN, generator=g),
        "model.norm.weight": torch.randn(HIDDEN, generator=g),
        "lm_head.weight": torch.randn(VOCAB, HIDDEN, generator=g),
    }
    for b in range(N_BLOCKS):
        tensors[f"model.layers.{b}.input_layernorm.weight"] = torch.randn(HIDDEN, generator=g)
        tensors[f"model.layers.{b}.self_attn.q_proj.weight"] = torch.randn(HIDDEN, HIDDEN, generator=g)
        tensors[f"model.layers.{b}.self_attn.q_proj.bias"] = torch.randn(HIDDEN, generator=g)
        tensors[f"model.layers.{b}.mlp.down_proj.weight"] = torch.randn(HIDDEN, 2 * HIDDEN, generator=g)
    return {name: t.to(torch.bfloat16) for name, t in tensors.items()}


@pytest.fixture
def source(tmp_path: Path) -> ModelSource:
    """A two-shard bf16 model dir with index, config and aux files, opened by model_source."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    tensors = _source_tensors()
    first = sorted(n for n in tensors if n.startswith(("model.embed_tokens.", "model.layers.0.")))
    second = sorted(n for n in tensors if n not in first)
    weight_map = {}
    for i, names in enumerate((first, second), start=1):
        file_name = f"model-{i:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in names}, model_dir / file_name, {"format": "pt"})
        weight_map.update(dict.fromkeys(names, file_name))
    index = {"metadata": {"total_size": 0}, "weight_map": dict(sorted(weight_map.items()))}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    config = {"model_type": "llama", "hidden_size": HIDDEN, "num_hidden_layers": N_BLOCKS, "dtype": "bfloat16"}
    (model_dir / "config.json").write_text(json.dumps(config))
    for name, data in AUX.items():
        (model_dir / name).write_bytes(data)
    return open_model_source(str(model_dir))


def _plan(source: ModelSource, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ShardPlan:
    """The checkpoint's plan as workers/output_plan.py makes it: each quantized weight becomes its packed
    tensors, every other tensor keeps the source's dtype and shape."""
    tensors = []
    for name, info in source.tensors.items():
        block_idx = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        stem = name.removesuffix(".weight")
        if block_idx is not None and stem.endswith(QUANTIZED):
            out_features, in_features = info.shape
            shapes = packed_shapes(out_features, in_features, BITS, GROUP_SIZE)
            tensors += [PlannedTensor(f"{stem}.{field}", _DTYPE_NAMES[shapes[field][1]], shapes[field][0], block_idx)
                        for field in PACKED_FIELDS]
        else:
            tensors.append(PlannedTensor(name, info.dtype, tuple(info.shape), block_idx))
    return plan_shards(tensors, max_shard_bytes)


def _block_part(b: int) -> dict[str, torch.Tensor]:
    """What rank 0 writes for block b: packed linears, the bias, the unquantized norm."""
    g = torch.Generator().manual_seed(100 + b)
    part = {
        f"model.layers.{b}.input_layernorm.weight": torch.randn(HIDDEN, generator=g).to(torch.bfloat16),
        f"model.layers.{b}.self_attn.q_proj.bias": torch.randn(HIDDEN, generator=g).to(torch.bfloat16),
    }
    for layer, k in (("self_attn.q_proj", HIDDEN), ("mlp.down_proj", 2 * HIDDEN)):
        prefix = f"model.layers.{b}.{layer}"
        words = {"qweight": (k // 8, HIDDEN), "qzeros": (k // 16, HIDDEN // 8)}  # 8 4-bit values per int32
        for field, shape in words.items():
            part[f"{prefix}.{field}"] = torch.randint(-(2**31), 2**31 - 1, shape, generator=g, dtype=torch.int32)
        part[f"{prefix}.scales"] = torch.rand(k // 16, HIDDEN, generator=g).to(torch.float16)
        part[f"{prefix}.g_idx"] = torch.arange(k, dtype=torch.int32) // 16
    return part


def _block_layers(b: int) -> list[dict]:
    return [layer for layer in REPORT["layers"] if layer["name"].startswith(f"model.layers.{b}.")]


def _write_block(out_dir: Path, plan: ShardPlan, b: int) -> None:
    """Block b as the job persists it: rank 0 writes it into its open shard; once it is durable the
    driver marks it done and closes its shard if b is that shard's last block."""
    shard = plan.shard_of_block(b)
    path = open_shard_path(out_dir, shard)
    prepare_shard(path, shard)
    write_shard_tensors(path, shard, _block_part(b), b)
    mark_block_done(out_dir, b, layers=_block_layers(b), stats={"seconds": {"solve": 0.25 * b}})
    closing = plan.closes_with(b)
    if closing is not None:
        close_shard(out_dir, closing)


def _stage_all_blocks(out_dir: Path, plan: ShardPlan) -> None:
    begin_staging(out_dir, FINGERPRINT, SPEC)
    resume = resume_point(out_dir, plan, inspect_output(out_dir, FINGERPRINT).done_blocks)
    for b in range(resume, N_BLOCKS):
        _write_block(out_dir, plan, b)


def _finish(out_dir: Path, source: ModelSource, plan: ShardPlan) -> list[str]:
    return finish_checkpoint(out_dir, source, plan, QUANT_CONFIG, REPORT, SPEC)


def _expected_checkpoint_tensors(source: ModelSource) -> dict[str, torch.Tensor]:
    """Block tensors as the workers wrote them, every other tensor as in the source."""
    parts = {name: t for b in range(N_BLOCKS) for name, t in _block_part(b).items()}
    rest = {name: read_source_tensor(source, name) for name in source.tensors if not name.startswith("model.layers.")}
    return {**parts, **rest}


def _files_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


def _finished_reference(tmp_path: Path, source: ModelSource, plan: ShardPlan) -> dict[str, bytes]:
    """The files of an uninterrupted job with the same inputs."""
    reference = tmp_path / "reference"
    _stage_all_blocks(reference, plan)
    _finish(reference, source, plan)
    return _files_bytes(reference)


def test_plan_of_the_test_source_has_the_layout_the_tests_rely_on(source):
    plan = _plan(source, SMALL_SHARDS)
    assert [shard.blocks for shard in plan.shards] == [(0, 1), (2,), (), ()]
    assert [plan.closes_with(b) for b in range(N_BLOCKS)] == [None, plan.shards[0], plan.shards[1]]
    assert sum(t.nbytes for t in plan.shards[0].block_tensors(0)) == 2528


# --- inspect_output ---------------------------------------------------------------------------


def test_missing_and_empty_output_dirs_are_fresh(tmp_path: Path):
    assert inspect_output(tmp_path / "absent", FINGERPRINT) == OutputState(complete=False, done_blocks=0)
    (tmp_path / "empty").mkdir()
    assert inspect_output(tmp_path / "empty", FINGERPRINT) == OutputState(complete=False, done_blocks=0)
    assert not (tmp_path / "absent").exists() and list((tmp_path / "empty").iterdir()) == []


def test_done_blocks_counts_contiguous_markers_from_block_0(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=0)
    for b in (0, 1, 3):
        mark_block_done(out, b)
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=2)


def test_directory_with_foreign_files_is_a_conflict_naming_the_file(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(OutputConflict) as err:
        inspect_output(out, FINGERPRINT)
    message = str(err.value)
    assert f"output.uri {out}" in message and "notes.txt" in message
    assert "choose another output.uri or delete the directory" in message
    with pytest.raises(OutputConflict):
        begin_staging(out, FINGERPRINT, SPEC)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_staging_of_another_job_is_a_conflict(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, "a" * 64, SPEC)
    with pytest.raises(OutputConflict) as err:
        inspect_output(out, "b" * 64)
    assert "unfinished output of another job (fingerprint aaaaaaaaaaaa, this job bbbbbbbbbbbb)" in str(err.value)
    with pytest.raises(OutputConflict):
        begin_staging(out, "b" * 64, SPEC)


def test_finished_checkpoint_is_complete_for_its_job_and_a_conflict_for_another(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source)
    _stage_all_blocks(out, plan)
    _finish(out, source, plan)
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=True, done_blocks=N_BLOCKS)
    with pytest.raises(OutputConflict) as err:
        inspect_output(out, "e" * 64)
    assert "finished checkpoint of another job" in str(err.value)
    assert "choose another output.uri or delete the directory" in str(err.value)


def test_manifest_not_written_by_rayquant_is_a_conflict(tmp_path: Path):
    out = tmp_path / "out"
    out.mkdir()
    (out / MANIFEST_FILE).write_text('{"files": []}')
    with pytest.raises(OutputConflict) as err:
        inspect_output(out, FINGERPRINT)
    assert "that rayquant did not write" in str(err.value)


# --- staging and markers ----------------------------------------------------------------------


def test_begin_staging_is_idempotent_and_records_the_job(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    job_path = out / STAGING / "job.json"
    first = job_path.read_bytes()
    begin_staging(out, FINGERPRINT, SPEC)
    assert job_path.read_bytes() == first
    assert json.loads(first) == {"job_fingerprint": FINGERPRINT, "resolved_spec": SPEC}
    assert sorted(p.name for p in (out / STAGING).iterdir()) == ["job.json"]


def test_marker_and_resume_point_without_staging_are_refused(tmp_path: Path, source):
    out = tmp_path / "out"
    with pytest.raises(StagingIncomplete) as err:
        mark_block_done(out, 0)
    assert "rerun the job from the start" in str(err.value)
    with pytest.raises(StagingIncomplete) as err:
        resume_point(out, _plan(source), 0)
    assert "rerun the job from the start" in str(err.value)
    assert not out.exists()


def test_marker_keeps_the_block_layer_records_and_stats_for_resume(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    mark_block_done(out, 1, layers=_block_layers(1), stats={"seconds": {"solve": 1.5}, "peak_memory_bytes": 7})
    assert read_block_layers(out, 1) == _block_layers(1)
    assert read_block_stats(out, 1) == {"seconds": {"solve": 1.5}, "peak_memory_bytes": 7}
    mark_block_done(out, 0)
    with pytest.raises(StagingIncomplete) as err:
        read_block_layers(out, 0)
    assert "no layer records for block 0" in str(err.value)
    assert read_block_stats(out, 0) == {}
    assert inspect_output(out, FINGERPRINT).done_blocks == 2


def test_discard_staging_removes_the_directory_it_created(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    _write_block(out, plan, 0)
    discard_staging(out)
    assert not out.exists()
    discard_staging(out)  # nothing left to discard
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=0)


def test_discard_staging_removes_the_shards_a_failed_fresh_job_closed(tmp_path: Path, source):
    """A fresh job that fails on bad input after its first shard closed leaves nothing behind, so the
    fixed job (another fingerprint) starts on an empty output."""
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    for b in plan.shards[0].blocks:
        _write_block(out, plan, b)
    assert (out / plan.shards[0].name).is_file()  # closed: the precondition of this test
    discard_staging(out)
    assert not out.exists()
    assert inspect_output(out, "b" * 64) == OutputState(complete=False, done_blocks=0)


def test_discard_staging_keeps_files_it_did_not_write(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    (out / "keep.txt").write_text("x")
    discard_staging(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# --- shards while the blocks run --------------------------------------------------------------


def test_open_shard_lives_in_staging_until_its_last_block_closes_it(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    shard = plan.shards[0]
    begin_staging(out, FINGERPRINT, SPEC)
    _write_block(out, plan, 0)
    assert open_shard_path(out, shard) == out / STAGING / shard.name
    assert (out / STAGING / shard.name).stat().st_size == shard.size and not (out / shard.name).exists()
    _write_block(out, plan, 1)
    assert open_shard_path(out, shard) == out / shard.name
    assert (out / shard.name).stat().st_size == shard.size and not (out / STAGING / shard.name).exists()


def test_close_shard_is_idempotent_and_the_manifest_records_the_final_files_sha256(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    _write_block(out, plan, 0)
    _write_block(out, plan, 1)  # closes the first shard
    shard = plan.shards[0]
    closed = (out / shard.name).read_bytes()
    close_shard(out, shard)
    close_shard(out, shard)
    assert (out / shard.name).read_bytes() == closed and not (out / STAGING / shard.name).exists()
    _write_block(out, plan, 2)
    _finish(out, source, plan)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    listed = {entry["path"]: entry for entry in manifest["files"]}
    for shard in plan.shards:
        data = (out / shard.name).read_bytes()
        assert listed[shard.name] == {"path": shard.name, "sha256": hashlib.sha256(data).hexdigest(),
                                      "size": len(data)}
    assert (out / plan.shards[0].name).read_bytes() == closed


# --- resume_point -----------------------------------------------------------------------------


def test_resume_point_stays_at_done_blocks_while_every_marked_shard_is_intact(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    _write_block(out, plan, 0)  # the first shard is open in staging, half filled
    assert resume_point(out, plan, 1) == 1
    _write_block(out, plan, 1)
    _write_block(out, plan, 2)  # both block shards closed
    assert resume_point(out, plan, N_BLOCKS) == N_BLOCKS
    assert inspect_output(out, FINGERPRINT).done_blocks == N_BLOCKS
    assert [read_block_layers(out, b) for b in range(N_BLOCKS)] == [_block_layers(b) for b in range(N_BLOCKS)]


def _deleted(path: Path, shard: PlannedShard) -> None:
    path.unlink()


def _truncated(path: Path, shard: PlannedShard) -> None:
    os.truncate(path, shard.size // 2)


def _other_header(path: Path, shard: PlannedShard) -> None:
    data = bytearray(path.read_bytes())
    data[len(shard.header) // 2] ^= 0x01  # same size, one header byte changed
    path.write_bytes(bytes(data))


DAMAGES = [_deleted, _truncated, _other_header]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_point_moves_back_to_the_first_block_of_a_damaged_closed_shard(tmp_path: Path, source, damage):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    _stage_all_blocks(out, plan)
    damage(out / plan.shards[0].name, plan.shards[0])
    assert resume_point(out, plan, N_BLOCKS) == 0
    # the markers from there on are gone: blocks 0..2 are quantized again
    assert inspect_output(out, FINGERPRINT).done_blocks == 0
    assert sorted(p.name for p in (out / STAGING).iterdir() if p.name.endswith(".done")) == []


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_point_keeps_the_markers_before_a_damaged_shard(tmp_path: Path, source, damage):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    _stage_all_blocks(out, plan)
    damage(out / plan.shards[1].name, plan.shards[1])
    assert resume_point(out, plan, N_BLOCKS) == 2
    assert inspect_output(out, FINGERPRINT).done_blocks == 2
    assert [read_block_layers(out, b) for b in (0, 1)] == [_block_layers(0), _block_layers(1)]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_point_moves_back_to_the_first_block_of_a_damaged_open_shard(tmp_path: Path, source, damage):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    _write_block(out, plan, 0)
    shard = plan.shards[0]
    damage(out / STAGING / shard.name, shard)
    assert resume_point(out, plan, 1) == 0
    assert inspect_output(out, FINGERPRINT).done_blocks == 0


@pytest.mark.parametrize("damage", DAMAGES)
def test_blocks_redone_after_a_damaged_shard_give_the_uninterrupted_checkpoint(tmp_path: Path, source, damage):
    plan = _plan(source, SMALL_SHARDS)
    reference = _finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    _stage_all_blocks(out, plan)
    damage(out / plan.shards[0].name, plan.shards[0])
    _stage_all_blocks(out, plan)  # the resumed job: resume_point, then blocks 0..2 again
    _finish(out, source, plan)
    assert _files_bytes(out) == reference
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    assert listed[plan.shards[0].name] == hashlib.sha256((out / plan.shards[0].name).read_bytes()).hexdigest()


# --- the finish -------------------------------------------------------------------------------


@pytest.mark.parametrize("max_shard_bytes", [1000, SMALL_SHARDS, DEFAULT_MAX_SHARD_BYTES])
def test_finished_checkpoint_holds_every_block_in_exactly_one_shard(tmp_path: Path, source, max_shard_bytes):
    out = tmp_path / "out"
    plan = _plan(source, max_shard_bytes)
    _stage_all_blocks(out, plan)
    _finish(out, source, plan)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    for b in range(N_BLOCKS):
        shards = {index["weight_map"][name] for name in _block_part(b)}
        assert shards == {plan.shard_of_block(b).name}, b
    in_files = [name for shard in plan.shards for name in load_file(out / shard.name)]
    assert sorted(in_files) == sorted(_expected_checkpoint_tensors(source))  # each tensor in one file, once


def test_finished_checkpoint_holds_block_and_source_tensors_in_save_file_shards(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    _stage_all_blocks(out, plan)
    files = _finish(out, source, plan)

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
                       _block_part(2)["model.layers.2.self_attn.q_proj.qweight"])

    assert files[-1] == MANIFEST_FILE and files[:-1] == sorted(files[:-1])
    assert set(files) == {p.name for p in out.iterdir()} and not (out / STAGING).exists()


def test_non_block_tensor_larger_than_max_shard_bytes_gets_a_shard_of_its_own(tmp_path: Path, source):
    out = tmp_path / "out"
    embed_bytes = VOCAB * HIDDEN * 2
    plan = _plan(source, embed_bytes - 1)
    _stage_all_blocks(out, plan)
    _finish(out, source, plan)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    embed_shard = index["weight_map"]["model.embed_tokens.weight"]
    assert [n for n, f in index["weight_map"].items() if f == embed_shard] == ["model.embed_tokens.weight"]
    assert list(load_file(out / embed_shard)) == ["model.embed_tokens.weight"]


def test_config_aux_files_report_and_model_card(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source)
    _stage_all_blocks(out, plan)
    _finish(out, source, plan)
    config = json.loads((out / "config.json").read_text())
    assert config == {**source.config, "quantization_config": QUANT_CONFIG}
    assert config["dtype"] == "bfloat16"
    assert config["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 16, "desc_act": False, "sym": True,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "act_group_aware": False,
        "checkpoint_format": "gptq", "meta": {"quantizer": ["rayquant:0.1.0"]},
    }
    for name, data in AUX.items():
        assert (out / name).read_bytes() == data
    assert json.loads((out / "report.json").read_text()) == REPORT
    card = (out / "README.md").read_text()
    assert "| model.layers.1.mlp.down_proj | 1.5 | 3 | 0.5000 | 0.01 |" in card
    assert "| model.layers.0.self_attn.q_proj | 0.5 | 2 | 0.2500 | 0.01 |" in card
    assert "| perplexity_quantized | 11.5 |" in card
    assert "`/models/tiny`" in card and f"`{source.revision[:12]}`" in card


def test_manifest_lists_every_other_file_with_its_sha256_and_size(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    _stage_all_blocks(out, plan)
    run_stats = {"job_id": "j1", "blocks": [{"seconds": {"solve": 0.5}}]}
    finish_checkpoint(out, source, plan, QUANT_CONFIG, REPORT, SPEC, run_stats=run_stats)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["job_fingerprint"] == FINGERPRINT and manifest["n_blocks"] == N_BLOCKS
    assert manifest["resolved_spec"] == SPEC and manifest["source_revision"] == source.revision
    listed = {entry["path"]: entry for entry in manifest["files"]}
    # run-stats.json records this run, not the model: the one file the manifest leaves out
    assert set(listed) == {p.name for p in out.iterdir()} - {MANIFEST_FILE, "run-stats.json"}
    assert json.loads((out / "run-stats.json").read_text()) == run_stats
    for name, entry in listed.items():
        data = (out / name).read_bytes()
        assert entry == {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_identical_inputs_give_byte_identical_checkpoints_also_over_stale_files(tmp_path: Path, source):
    plan = _plan(source, SMALL_SHARDS)
    reference = _finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    _stage_all_blocks(out, plan)
    # an earlier attempt under another shard size died after writing a shard and the config
    (out / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    (out / "config.json").write_text("{}")
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=N_BLOCKS)
    _finish(out, source, plan)
    assert _files_bytes(out) == reference


def test_finish_interrupted_after_the_shards_closed_gives_byte_identical_files_when_rerun(tmp_path: Path, source):
    plan = _plan(source, SMALL_SHARDS)
    reference = _finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    _stage_all_blocks(out, plan)
    # README.md cannot be written over a directory: the finish stops after shards, index, config, aux
    (out / "README.md").mkdir()
    with pytest.raises(OSError):
        _finish(out, source, plan)
    assert all((out / shard.name).is_file() for shard in plan.shards)
    assert (out / "config.json").is_file() and not (out / MANIFEST_FILE).exists()
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=N_BLOCKS)
    (out / "README.md").rmdir()
    _finish(out, source, plan)
    assert _files_bytes(out) == reference


def test_finish_before_every_block_is_marked_names_the_resume_block(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    _write_block(out, plan, 0)
    _write_block(out, plan, 1)
    with pytest.raises(StagingIncomplete) as err:
        _finish(out, source, plan)
    assert "block 2 of 3 has no marker" in str(err.value) and "resume from block 2" in str(err.value)
    assert not (out / MANIFEST_FILE).exists() and (out / STAGING).is_dir()


def test_quantization_config_with_other_keys_is_refused(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = _plan(source)
    _stage_all_blocks(out, plan)
    with pytest.raises(ValueError) as err:
        finish_checkpoint(out, source, plan, {**QUANT_CONFIG, "format": "gptq"}, REPORT, SPEC)
    assert "extra ['format']" in str(err.value)
    assert not (out / MANIFEST_FILE).exists()

"""The staging area on real safetensors files: what the output holds, markers, open and closed shards, resume."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from rayquant.storage.output_layout import MANIFEST_FILE, STAGING
from rayquant.storage.staging import (
    OutputConflict,
    OutputState,
    StagingIncomplete,
    begin_staging,
    close_shard,
    discard_staging,
    inspect_output,
    mark_block_done,
    open_shard_path,
    read_block_marker,
    resume_point,
)

from .staged_output import (DAMAGES, FINGERPRINT, N_BLOCKS, SMALL_SHARDS, SPEC, block_layers, block_stats, files_bytes,
                            finish, finished_reference, plan_of, stage_all_blocks, write_block)


def test_plan_of_the_test_source_has_the_layout_the_tests_rely_on(source):
    plan = plan_of(source, SMALL_SHARDS)
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
        mark_block_done(out, b, layers=block_layers(b), stats=block_stats(b))
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
    plan = plan_of(source)
    stage_all_blocks(out, plan)
    finish(out, source, plan)
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
        mark_block_done(out, 0, layers=block_layers(0), stats=block_stats(0))
    assert "rerun the job from the start" in str(err.value)
    with pytest.raises(StagingIncomplete) as err:
        resume_point(out, plan_of(source), 0)
    assert "rerun the job from the start" in str(err.value)
    assert not out.exists()


def test_marker_keeps_the_block_layer_records_and_stats_for_resume(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    mark_block_done(out, 1, layers=block_layers(1), stats=block_stats(1))
    marker = read_block_marker(out, 1)
    assert (marker.block_idx, marker.layers, marker.stats) == (1, tuple(block_layers(1)), block_stats(1))
    assert inspect_output(out, FINGERPRINT).done_blocks == 0
    with pytest.raises(StagingIncomplete) as err:
        read_block_marker(out, 0)
    assert "no usable marker for block 0 (block-00000.done: missing" in str(err.value)


def test_marker_file_keeps_the_json_a_resumed_job_reads(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    mark_block_done(out, 0, layers=block_layers(0), stats=block_stats(0))
    assert json.loads((out / STAGING / "block-00000.done").read_text()) == {
        "block_idx": 0,
        "layers": [{"name": "model.layers.0.self_attn.q_proj", "input_group": "self_attn.q_proj", "in_features": 32,
                    "out_features": 32, "gptq_loss": 0.5, "rtn_loss": 2.0, "damp_percent": 0.01, "n_tokens": 512,
                    "owner": 0, "max_rel_err": 2.5e-7, "mean_rel_err": 1e-7, "routed_tokens": None,
                    "starved_policy": None},
                   {"name": "model.layers.0.mlp.down_proj", "input_group": "mlp.down_proj", "in_features": 32,
                    "out_features": 32, "gptq_loss": 0.5, "rtn_loss": 2.0, "damp_percent": 0.01, "n_tokens": 512,
                    "owner": 0, "max_rel_err": 2.5e-7, "mean_rel_err": 1e-7, "routed_tokens": None,
                    "starved_policy": None}],
        "stats": {"block": 0, "seconds": {"solve": 0.0, "persist": 0.125}, "peak_memory_bytes": [7, 9],
                  "bytes_received": [{"load": 16, "share": 8}, {"load": 32}]},
    }


@pytest.mark.parametrize(("damage", "named"), [
    (lambda m: m.write_text("{not json"), "missing or not a JSON object"),
    (lambda m: m.write_text(m.read_text().replace('"n_tokens": 512', '"n_tokens": "512"', 1)),
     "block-00000.done.layers[0].n_tokens: expected int, got str '512'"),
    (lambda m: m.write_text(m.read_text().replace('"stats": {', '"stats": {"gpu": 1, ', 1)),
     "block-00000.done.stats: unknown field 'gpu'"),
    (lambda m: m.write_text(m.read_text().replace('"block_idx": 0', '"block_idx": 3', 1)),
     "block-00000.done: block_idx is 3"),
])
def test_damaged_marker_is_refused_naming_what_is_wrong(tmp_path: Path, damage, named):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    mark_block_done(out, 0, layers=block_layers(0), stats=block_stats(0))
    damage(out / STAGING / "block-00000.done")
    with pytest.raises(StagingIncomplete) as err:
        read_block_marker(out, 0)
    assert named in str(err.value)
    assert "no usable marker for block 0" in str(err.value)
    assert "delete the output directory and rerun the job" in str(err.value)


def test_discard_staging_removes_the_directory_it_created(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    write_block(out, plan, 0)
    discard_staging(out)
    assert not out.exists()
    discard_staging(out)  # nothing left to discard
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=0)


def test_discard_staging_removes_the_shards_a_failed_fresh_job_closed(tmp_path: Path, source):
    """A fresh job that fails on bad input after its first shard closed leaves nothing behind, so the
    fixed job (another fingerprint) starts on an empty output."""
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    for b in plan.shards[0].blocks:
        write_block(out, plan, b)
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
    plan = plan_of(source, SMALL_SHARDS)
    shard = plan.shards[0]
    begin_staging(out, FINGERPRINT, SPEC)
    write_block(out, plan, 0)
    assert open_shard_path(out, shard) == out / STAGING / shard.name
    assert (out / STAGING / shard.name).stat().st_size == shard.size and not (out / shard.name).exists()
    write_block(out, plan, 1)
    assert open_shard_path(out, shard) == out / shard.name
    assert (out / shard.name).stat().st_size == shard.size and not (out / STAGING / shard.name).exists()


def test_close_shard_is_idempotent_and_the_manifest_records_the_final_files_sha256(tmp_path: Path, source):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    write_block(out, plan, 0)
    write_block(out, plan, 1)  # closes the first shard
    shard = plan.shards[0]
    closed = (out / shard.name).read_bytes()
    close_shard(out, shard)
    close_shard(out, shard)
    assert (out / shard.name).read_bytes() == closed and not (out / STAGING / shard.name).exists()
    write_block(out, plan, 2)
    finish(out, source, plan)
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
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    write_block(out, plan, 0)  # the first shard is open in staging, half filled
    assert resume_point(out, plan, 1) == 1
    write_block(out, plan, 1)
    write_block(out, plan, 2)  # both block shards closed
    assert resume_point(out, plan, N_BLOCKS) == N_BLOCKS
    assert inspect_output(out, FINGERPRINT).done_blocks == N_BLOCKS
    assert [read_block_marker(out, b).layers for b in range(N_BLOCKS)] == [tuple(block_layers(b))
                                                                           for b in range(N_BLOCKS)]


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize(("damaged_shard", "resume"), [(0, 0), (1, 2)])
def test_resume_point_moves_back_to_the_first_block_of_a_damaged_closed_shard(tmp_path: Path, source, damage,
                                                                              damaged_shard, resume):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    stage_all_blocks(out, plan)
    damage(out / plan.shards[damaged_shard].name, plan.shards[damaged_shard])
    assert resume_point(out, plan, N_BLOCKS) == resume
    # the markers from there on are gone (those blocks are quantized again); the ones before are kept
    assert inspect_output(out, FINGERPRINT).done_blocks == resume
    assert sorted(p.name for p in (out / STAGING).iterdir() if p.name.endswith(".done")) == [
        f"block-{b:05d}.done" for b in range(resume)]
    assert [read_block_marker(out, b).stats for b in range(resume)] == [block_stats(b) for b in range(resume)]


@pytest.mark.parametrize("damage", DAMAGES)
def test_resume_point_moves_back_to_the_first_block_of_a_damaged_open_shard(tmp_path: Path, source, damage):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    write_block(out, plan, 0)
    shard = plan.shards[0]
    damage(out / STAGING / shard.name, shard)
    assert resume_point(out, plan, 1) == 0
    assert inspect_output(out, FINGERPRINT).done_blocks == 0


@pytest.mark.parametrize("damage", DAMAGES)
def test_blocks_redone_after_a_damaged_shard_give_the_uninterrupted_checkpoint(tmp_path: Path, source, damage):
    plan = plan_of(source, SMALL_SHARDS)
    reference = finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    stage_all_blocks(out, plan)
    damage(out / plan.shards[0].name, plan.shards[0])
    stage_all_blocks(out, plan)  # the resumed job: resume_point, then blocks 0..2 again
    finish(out, source, plan)
    assert files_bytes(out) == reference
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    listed = {entry["path"]: entry["sha256"] for entry in manifest["files"]}
    assert listed[plan.shards[0].name] == hashlib.sha256((out / plan.shards[0].name).read_bytes()).hexdigest()


def test_free_space_check_counts_only_the_blocks_still_to_write(tmp_path):
    import shutil

    from rayquant.storage.staging import NotEnoughDisk, check_free_space

    class Plan:  # the two things check_free_space reads of a ShardPlan
        def __init__(self, total: int):
            self.total_tensor_bytes = total
            self.shards = [type("Shard", (), {"blocks": (0, 1, 2, 3)})()]

    free = shutil.disk_usage(tmp_path).free
    check_free_space(tmp_path / "new" / "out", Plan(free // 4), resume=0)  # a missing folder: its parent's disk
    with pytest.raises(NotEnoughDisk) as err:
        check_free_space(tmp_path / "out", Plan(free * 2), resume=0)
    assert "GiB free" in str(err.value) and "run the same command again" in str(err.value)
    check_free_space(tmp_path / "out", Plan(free * 2), resume=3)  # one block of four left: a quarter of it

"""A finished output is verified before a rerun calls it complete; damaged staging costs blocks, not the job;
names from manifests, closed-shard records and model directories never leave their directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from rayquant.storage.model_source import InvalidModelFiles, open_model_source
from rayquant.storage.output_layout import MANIFEST_FILE, STAGING
from rayquant.storage.staging import (OutputDamaged, OutputState, begin_staging, inspect_output, mark_block_done,
                                     read_block_marker, resume_point)

from .staged_output import (FINGERPRINT, N_BLOCKS, SMALL_SHARDS, SPEC, block_layers, block_stats, files_bytes, finish,
                            finished_reference, plan_of, stage_all_blocks)

FIX = "delete the output directory and rerun the job"


@pytest.fixture
def finished(tmp_path: Path, source) -> Path:
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    stage_all_blocks(out, plan)
    finish(out, source, plan)
    return out


def _manifest(out: Path) -> dict:
    return json.loads((out / MANIFEST_FILE).read_text())


def _first_shard(out: Path) -> str:
    return next(e["path"] for e in _manifest(out)["files"] if e["path"].endswith(".safetensors"))


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x40
    path.write_bytes(bytes(data))


# --- a finished output is verified -----------------------------------------------------------


def test_intact_finished_output_is_complete_in_both_modes(finished: Path):
    for verify in ("sizes", "hashes"):
        assert inspect_output(finished, FINGERPRINT, verify) == OutputState(complete=True, done_blocks=N_BLOCKS)


def test_flipped_byte_is_caught_by_hashes_naming_the_file(finished: Path):
    shard = _first_shard(finished)
    _flip_last_byte(finished / shard)
    assert inspect_output(finished, FINGERPRINT, "sizes").complete  # sizes: the documented blind spot
    with pytest.raises(OutputDamaged) as err:
        inspect_output(finished, FINGERPRINT, "hashes")
    assert f"but {shard} has changed (its sha256 differs from the manifest's" in str(err.value)
    assert FIX in str(err.value)


@pytest.mark.parametrize("verify", ["sizes", "hashes"])
def test_deleted_shard_is_caught_by_sizes_alone(finished: Path, verify: str):
    shard = _first_shard(finished)
    (finished / shard).unlink()
    with pytest.raises(OutputDamaged) as err:
        inspect_output(finished, FINGERPRINT, verify)
    assert str(err.value) == (f"output.uri {finished} holds this job's finished checkpoint, but {shard} is missing; "
                              f"{FIX} (it writes the same bytes again)")


@pytest.mark.parametrize("verify", ["sizes", "hashes"])
def test_resized_file_is_caught_by_sizes_alone(finished: Path, verify: str):
    size = (finished / "config.json").stat().st_size
    with (finished / "config.json").open("ab") as f:
        f.write(b" ")
    with pytest.raises(OutputDamaged, match=f"but config.json is {size + 1} bytes, the manifest records {size}; "):
        inspect_output(finished, FINGERPRINT, verify)


def test_leftover_staging_after_the_manifest_is_removed_by_the_rerun(finished: Path):
    """The driver was killed between writing the manifest and removing its staging area."""
    (finished / STAGING).mkdir()
    (finished / STAGING / "block-00000.done").write_text("{}")
    with capture_logs() as logs:
        assert inspect_output(finished, FINGERPRINT).complete
    assert not (finished / STAGING).exists()
    assert [e["event"] for e in logs] == ["leftover_staging_removed"]
    assert inspect_output(finished, FINGERPRINT).complete  # idempotent


def test_damaged_output_keeps_its_staging_and_files(finished: Path):
    before = files_bytes(finished)
    (finished / STAGING).mkdir()
    (finished / "report.json").unlink()
    with pytest.raises(OutputDamaged, match="report.json is missing"):
        inspect_output(finished, FINGERPRINT)
    assert (finished / STAGING).is_dir()
    assert {p.name for p in finished.iterdir() if p.is_file()} == set(before) - {"report.json"}


# --- names in a manifest ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../outside.txt", "/etc/hostname", "sub/../../x", "..", "a\\..\\b"])
def test_manifest_naming_a_path_outside_the_output_is_damaged(finished: Path, tmp_path: Path, name: str):
    (tmp_path / "outside.txt").write_text("secret")
    manifest = _manifest(finished)
    manifest["files"].append({"path": name, "size": 6, "sha256": "0" * 64})
    (finished / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(OutputDamaged) as err:
        inspect_output(finished, FINGERPRINT, "sizes")
    assert f"the manifest names {name!r}, a path outside the output directory; {FIX}" in str(err.value)


def test_manifest_file_replaced_by_a_link_is_damaged(finished: Path, tmp_path: Path):
    (tmp_path / "elsewhere.json").write_bytes((finished / "config.json").read_bytes())
    (finished / "config.json").unlink()
    (finished / "config.json").symlink_to(tmp_path / "elsewhere.json")
    with pytest.raises(OutputDamaged, match="config.json is not a regular file"):
        inspect_output(finished, FINGERPRINT)


@pytest.mark.parametrize("files", [None, "model.safetensors", [{"path": "config.json"}], [{"path": 1, "size": 1,
                                                                                            "sha256": "x"}]])
def test_manifest_without_a_valid_file_list_is_damaged(finished: Path, files):
    manifest = _manifest(finished)
    manifest["files"] = files
    (finished / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(OutputDamaged, match=f"has no valid file list .*; {FIX}"):
        inspect_output(finished, FINGERPRINT)


def test_damaged_closed_shard_record_is_rehashed_not_trusted(tmp_path: Path, source):
    """A closed shard's checksum record names another path: the manifest still lists the shard itself."""
    plan = plan_of(source, SMALL_SHARDS)
    reference = finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    stage_all_blocks(out, plan)
    record = out / STAGING / f"{plan.shards[0].name}.closed.json"
    record.write_text(json.dumps({"path": "../../etc/passwd", "sha256": "0" * 64, "size": 1}))
    finish(out, source, plan)
    assert files_bytes(out) == reference
    assert inspect_output(out, FINGERPRINT, "hashes").complete


# --- damaged block markers -------------------------------------------------------------------


@pytest.mark.parametrize("damage", [
    lambda m: m.write_text("{not json"),
    lambda m: m.write_bytes(b"\xff\xfe"),
    lambda m: m.write_text(m.read_text().replace('"block_idx": 1', '"block_idx": 7', 1)),
])
def test_damaged_marker_moves_the_resume_point_back_to_its_block(tmp_path: Path, source, damage):
    out = tmp_path / "out"
    plan = plan_of(source, SMALL_SHARDS)
    begin_staging(out, FINGERPRINT, SPEC)
    for b in range(N_BLOCKS):
        mark_block_done(out, b, layers=block_layers(b), stats=block_stats(b))
    damage(out / STAGING / "block-00001.done")
    assert inspect_output(out, FINGERPRINT).done_blocks == N_BLOCKS  # markers exist: counted, not yet parsed
    with capture_logs() as logs:
        assert resume_point(out, plan, N_BLOCKS) == 0  # block 0's shard holds no bytes yet: from 0
    assert [e["event"] for e in logs] == ["damaged_block_marker"]
    assert logs[0]["block_idx"] == 1 and logs[0]["log_level"] == "warning"


def test_resume_after_a_damaged_marker_writes_the_reference_bytes(tmp_path: Path, source):
    plan = plan_of(source, SMALL_SHARDS)
    reference = finished_reference(tmp_path, source, plan)
    out = tmp_path / "out"
    stage_all_blocks(out, plan)
    (out / STAGING / "block-00002.done").write_text("[]")
    assert resume_point(out, plan, N_BLOCKS) == 2
    assert not (out / STAGING / "block-00002.done").exists()
    assert read_block_marker(out, 1).layers == tuple(block_layers(1))  # blocks before it replay from markers
    stage_all_blocks(out, plan)  # the resumed job redoes block 2
    finish(out, source, plan)
    assert files_bytes(out) == reference


# --- links in a model directory --------------------------------------------------------------


def test_model_dir_link_to_a_file_outside_is_refused(tmp_path: Path, llama_tiny_dir: Path):
    model = tmp_path / "model"
    shutil.copytree(llama_tiny_dir, model)
    (tmp_path / "secret.txt").write_text("aws_secret_access_key=...")
    (model / "tokenizer.json").unlink(missing_ok=True)
    (model / "tokenizer.json").symlink_to(tmp_path / "secret.txt")
    with pytest.raises(InvalidModelFiles) as err:
        open_model_source(str(model))
    assert f"{model / 'tokenizer.json'} is a link to {tmp_path / 'secret.txt'}, outside the model directory" in str(
        err.value)
    assert "copy the file into the directory" in str(err.value)


def test_hub_cache_snapshot_links_into_its_blobs_are_accepted(tmp_path: Path, llama_tiny_dir: Path):
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, f in enumerate(sorted(p for p in llama_tiny_dir.iterdir() if p.is_file())):
        shutil.copyfile(f, repo / "blobs" / f"blob{i}")
        (snapshot / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    linked = open_model_source(str(snapshot))
    assert linked.revision == open_model_source(str(llama_tiny_dir)).revision
    assert linked.path == snapshot


# --- end to end: the CLI on a finished output ------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
QUICK = ("calibration.n_samples=8", "calibration.seq_len=64", "calibration.eval_samples=0")


def _quantize(out: Path) -> subprocess.CompletedProcess:
    sets = [a for s in (*QUICK, f"output.uri={out}") for a in ("--set", s)]
    return subprocess.run([sys.executable, "-m", "rayquant.jobs.cli", "quantize",
                           str(REPO / "jobs" / "specs" / "tiny-llama.yaml"), *sets],
                          capture_output=True, text=True, timeout=600, cwd=REPO, check=False)


@pytest.fixture(scope="module")
def cli_output(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verified") / "out"
    proc = _quantize(out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_cli_rerun_removes_leftover_staging_then_refuses_a_flipped_byte(cli_output: Path):
    before = files_bytes_but_run_stats(cli_output)
    (cli_output / STAGING).mkdir()  # the driver died between the manifest and the clean-up
    (cli_output / STAGING / "job.json").write_text("{}")
    rerun = _quantize(cli_output)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert '"event": "job_already_complete"' in rerun.stderr and '"event": "leftover_staging_removed"' in rerun.stderr
    assert not (cli_output / STAGING).exists() and files_bytes_but_run_stats(cli_output) == before

    shard = _first_shard(cli_output)
    _flip_last_byte(cli_output / shard)
    damaged = _quantize(cli_output)
    assert damaged.returncode == 2, damaged.stderr[-3000:]
    errors = [line for line in damaged.stderr.splitlines() if line.startswith("error:")]
    assert errors == [(f"error: OutputDamaged: output.uri {cli_output} holds this job's finished checkpoint, but "
                       f"{shard} has changed (its sha256 differs from the manifest's "
                       f"{_entry(cli_output, shard)['sha256'][:12]}); {FIX} (it writes the same bytes again)")]
    assert "Traceback" not in damaged.stderr
    assert (cli_output / shard).is_file()  # refused, nothing removed


def files_bytes_but_run_stats(out: Path) -> dict[str, bytes]:
    return {name: data for name, data in files_bytes(out).items() if name != "run-stats.json"}


def _entry(out: Path, name: str) -> dict:
    return next(e for e in _manifest(out)["files"] if e["path"] == name)

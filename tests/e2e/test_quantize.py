"""The CLI end to end on the embedded Ray: what a user runs, read back by an independent loader."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rayquant.solver.gptq import GPTQConfig
from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import open_model_source
from rayquant.storage.safetensors_reader import read_safetensors_header
from rayquant.workers.evaluation import perplexity, window_nll

from .models import (REPO, SPEC, dequantized_model, fp_model, log_events, logit_mse, logits, output_files, rtn_model,
                     run_cli)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def source_dir() -> Path:
    return open_model_source("synthetic://llama-tiny").path


@pytest.fixture(scope="module")
def eval_ids(source_dir):
    return load_calibration("builtin://text", source_dir, 32, 256, 8, 0).eval_samples


@pytest.fixture(scope="module")
def run_w2(quantize_once):
    run = quantize_once()  # the shipped spec as it is: the job test_vllm hands to vLLM
    return run.proc, run.output()


def test_quantize_prints_progress_and_output_last_and_checksums_every_file(run_w2):
    proc, out = run_w2
    assert proc.stdout.strip().splitlines()[-1] == str(out.resolve())
    # stderr is a pipe here: every line one JSON object (no Ray warnings, no worker prefixes, no colours)
    events = [json.loads(line) for line in proc.stderr.splitlines()]
    assert "\x1b[" not in proc.stderr
    assert [e["event"] for e in events][:3] == ["job_starting", "driver_imported", "calibration_records"]
    ready = [e for e in events if e["event"] == "workers_ready"]
    assert len(ready) == 1 and ready[0]["workers"] == 2 and ready[0]["seconds"] > ready[0]["ray_seconds"] > 0
    progress = [e for e in events if e["event"] == "block_done"]
    assert [(e["block"], e["progress"]) for e in progress] == [(b, f"{b + 1}/4") for b in range(4)]
    assert all(e["eta_s"] >= 0 and e["stages"]["solve"] > 0 and e["job_id"] == ready[0]["job_id"] for e in progress)
    assert progress[-1]["eta_s"] == 0
    manifest = json.loads((out / "rayquant-manifest.json").read_text())
    files = {f["path"]: f for f in manifest["files"]}
    written = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    assert set(files) == written - {"rayquant-manifest.json", "run-stats.json"}  # run stats: not the model
    stats = json.loads((out / "run-stats.json").read_text())
    assert [b["block"] for b in stats["blocks"]] == [0, 1, 2, 3]
    assert all(len(b["peak_memory_bytes"]) == 2 and min(b["peak_memory_bytes"]) > 0 for b in stats["blocks"])
    assert all(b["seconds"]["solve"] > 0 and b["seconds"]["eval"] > 0 for b in stats["blocks"])
    for path, entry in files.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == entry["sha256"]
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc == {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
                  "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "act_group_aware": True,
                  "checkpoint_format": "gptq", "meta": {"quantizer": ["rayquant:0.1.0"]}}
    assert not (out / ".rayquant-staging").exists()


def test_transformers_gptq_path_loads_output_closer_to_fp_than_rtn(run_w2, source_dir, eval_ids):
    from .gptq_loader import load_gptq_logits

    _, out = run_w2
    fp = logits(fp_model(source_dir), eval_ids)
    loaded = load_gptq_logits(out, eval_ids, bits=4)
    ours = logits(dequantized_model(source_dir, out), eval_ids)
    rtn = logits(rtn_model(source_dir, GPTQConfig(bits=4, group_size=128, sym=True)), eval_ids)
    # The independent loader reads exactly what rayquant meant (fp16 scales, fp32 math here).
    assert logit_mse(loaded, ours) < 1e-3 * logit_mse(ours, fp)
    assert logit_mse(loaded, fp) <= logit_mse(rtn, fp)


def test_running_a_finished_job_again_changes_nothing(run_w2):
    proc, out = run_w2
    before = output_files(out)
    again = run_cli("quantize", str(SPEC), "--set", f"output.uri={out}")
    assert again.returncode == 0 and "job_already_complete" in again.stderr
    assert output_files(out) == before


@pytest.fixture(scope="module")
def run_w1_with_rtn_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("w1") / "out"
    proc = run_cli("quantize", str(SPEC), "--set", f"output.uri={out}", "--set", "cluster.num_workers=1",
                   "--set", "calibration.eval_rtn=true")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def _ppl(model, ids) -> float:
    return perplexity(*window_nll(logits(model, ids), ids))


@pytest.mark.parametrize("run", ["w1_rtn", "w2"])
def test_in_pass_perplexities_equal_a_separate_evaluation(run, run_w2, run_w1_with_rtn_eval, source_dir, eval_ids):
    out = run_w1_with_rtn_eval if run == "w1_rtn" else run_w2[1]
    evaluation = json.loads((out / "report.json").read_text())["eval"]
    assert evaluation["n_windows"] == len(eval_ids) and evaluation["n_tokens"] == eval_ids.numel() - len(eval_ids)
    expected = {"fp_ppl": _ppl(fp_model(source_dir), eval_ids),
                "gptq_ppl": _ppl(dequantized_model(source_dir, out), eval_ids)}
    if run == "w1_rtn":
        expected["rtn_ppl"] = _ppl(rtn_model(source_dir, GPTQConfig(bits=4, group_size=128, sym=True)), eval_ids)
    else:
        assert "rtn_ppl" not in evaluation  # only when asked
    for key, value in expected.items():  # block-by-block vs whole-model forward: float rounding only
        assert evaluation[key] == pytest.approx(value, rel=1e-5), key
    assert evaluation["ppl_delta"] == pytest.approx(evaluation["gptq_ppl"] - evaluation["fp_ppl"])
    card = (out / "README.md").read_text()
    assert f"| gptq_ppl | {evaluation['gptq_ppl']:.6g} |" in card


def test_one_and_two_workers_agree_on_losses_and_logit_error(run_w2, run_w1_with_rtn_eval, source_dir, eval_ids):
    _, out2 = run_w2
    out1 = run_w1_with_rtn_eval
    layers1 = {x["name"]: x for x in json.loads((out1 / "report.json").read_text())["layers"]}
    layers2 = {x["name"]: x for x in json.loads((out2 / "report.json").read_text())["layers"]}
    assert set(layers1) == set(layers2) and len(layers1) == 4 * 7
    for name, a in layers1.items():
        b = layers2[name]
        assert abs(a["gptq_loss"] - b["gptq_loss"]) <= 0.005 * a["gptq_loss"], name
        # W = 1: rank 0 solves everything; W = 2: one input group per true_sequential stage, so both
        # ranks solve a slice of every linear's rows (owner -1, workers/row_split.py)
        assert (a["owner"], b["owner"]) == (0, -1), name
    fp = logits(fp_model(source_dir), eval_ids)
    err1 = logit_mse(logits(dequantized_model(source_dir, out1), eval_ids), fp)
    err2 = logit_mse(logits(dequantized_model(source_dir, out2), eval_ids), fp)
    assert abs(err1 - err2) <= 0.02 * err2


def test_sigkill_after_a_block_marker_and_mid_write_then_resume_writes_identical_bytes(run_w2, tmp_path):
    """Killed after a marker while the next blocks are being written into the open shard: the resumed
    job rewrites their regions (here scribbled over, as a write cut short leaves them) and ends
    byte-identical to an uninterrupted run. So the same spec run twice writes identical bytes: every
    block here was computed by another process than the reference's (the killed job or the resumed one)."""
    _, reference = run_w2
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC), "--set", f"output.uri={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    staging = out / ".rayquant-staging"
    deadline = time.monotonic() + 300
    while not list(staging.glob("*.done")):
        assert proc.poll() is None, "the job ended before writing its first block marker"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and every Ray process it started
    proc.wait()
    assert not (out / "rayquant-manifest.json").exists(), "the job finished before it was killed"
    done_before = len(list(staging.glob("*.done")))
    assert 1 <= done_before <= 4  # 4: killed while finishing, which must resume just as well
    (shard,) = staging.glob("model-*.safetensors")  # the tiny model's one shard, still open
    scribbled = _scribble_blocks_from(shard, done_before)
    assert scribbled or done_before == 4

    resumed = run_cli("quantize", str(SPEC), "--set", f"output.uri={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    planned = log_events(resumed.stderr, "job_planned")
    assert planned and planned[0]["resume_from"] == done_before, (done_before, resumed.stderr[-3000:])
    assert output_files(out) == output_files(reference)


def _scribble_blocks_from(shard: Path, first_block: int) -> int:
    """Overwrite the bytes of every tensor of blocks >= first_block with noise; returns how many."""
    header = read_safetensors_header(shard)
    noise = [info for name, info in header.items()
             if name.startswith("model.layers.") and int(name.split(".")[2]) >= first_block]
    with shard.open("r+b") as f:
        for info in noise:
            f.seek(info.start)
            f.write(os.urandom(info.nbytes))
    return len(noise)


def test_small_shards_close_during_the_job_and_resume_after_sigkill_to_the_same_bytes(run_w2, tmp_path):
    """With shards of about one block, shards close (move to their final names) while later blocks run;
    a job killed after the first one closed resumes to the bytes of an uninterrupted run, and the
    tensors are the one-shard run's."""
    _, one_shard = run_w2
    small = ["--set", "output.max_shard_bytes=120000"]
    whole = tmp_path / "whole"
    proc = run_cli("quantize", str(SPEC), *small, "--set", f"output.uri={whole}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    shards = sorted(whole.glob("model-*.safetensors"))
    assert len(shards) >= 3, [s.name for s in shards]
    assert _tensors(whole) == _tensors(one_shard)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC), *small, "--set", f"output.uri={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    deadline = time.monotonic() + 300
    while not list(out.glob("model-00001-of-*.safetensors")):  # the first block shard closed (the non-block
        # tensors' own shards close as soon as they are written, before any block)
        assert proc.poll() is None, "the job ended before closing its first shard"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "rayquant-manifest.json").exists(), "the job finished before it was killed"
    resumed = run_cli("quantize", str(SPEC), *small, "--set", f"output.uri={out}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert log_events(resumed.stderr, "job_planned")[0]["resume_from"] >= 1
    assert output_files(out) == output_files(whole)


def _tensors(out: Path) -> dict[str, bytes]:
    """Every tensor of an output by name, as raw bytes, whichever shard holds it."""
    tensors = {}
    for shard in out.glob("model-*.safetensors"):
        for name, info in read_safetensors_header(shard).items():
            with shard.open("rb") as f:
                f.seek(info.start)
                tensors[name] = (info.dtype, info.shape, f.read(info.nbytes))
    return tensors


def test_a_run_waits_for_a_live_lock_of_the_same_job_and_refuses_another_jobs(tmp_path):
    """One job per output: a live holder of another job → exit 2 naming it, at once; a live holder of the same
    job (the same command run twice, or a resubmission while Ray still stops the last attempt) is waited
    for, and the job then runs. The holders here are this test process: the same job's lock is released once
    the CLI logs that it waits for it."""
    from rayquant.jobs.spec import load_spec
    from rayquant.storage.model_source import open_model_source
    from rayquant.storage.output_claims import OutputLock, lock_holder

    out = tmp_path / "locked"
    spec = load_spec(SPEC, [f"output.uri={out}"])
    fingerprint = spec.fingerprint(open_model_source(spec.model.source).revision)
    other = OutputLock(str(out), lock_holder("other-job"), "0" * 64)
    other.acquire()
    try:
        refused = run_cli("quantize", str(SPEC), "--set", f"output.uri={out}")
    finally:
        other.release()
    line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 2 and line.startswith("error: OutputLocked") and "other-job@" in line, line

    same = OutputLock(str(out), lock_holder("same-job"), fingerprint)
    same.acquire()
    cmd = [sys.executable, "-m", "rayquant.jobs.cli", "quantize", str(SPEC), "--set", f"output.uri={out}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    try:
        for line in proc.stderr:  # the lock goes once the job says it waits for it, however long start-up took
            lines.append(line)
            if '"output_lock_wait"' in line:
                break
    finally:
        same.release()
    _, tail = proc.communicate(timeout=300)
    stderr = "".join(lines) + tail
    assert proc.returncode == 0, stderr[-3000:]
    waited = log_events(stderr, "output_lock_wait")
    assert len(waited) == 1 and waited[0]["holder"] == lock_holder("same-job")
    assert len(log_events(stderr, "block_done")) == 4 and (out / "rayquant-manifest.json").is_file()

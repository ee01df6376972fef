"""`rayquant eval`: perplexity of GPTQ v1 checkpoints (rayquant's and GPTQModel's) with rayquant's own reader.

The model is the tiny Llama after a short training run (trained_model.py): on a random-init model
quantization moves perplexity by noise of either sign, on a trained one fp < GPTQ < RTN holds.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayquant.jobs.cli import main
from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed, pack_qweight, pack_qzeros, unpack_linear
from rayquant.storage.calibration import load_calibration
from rayquant.workers.checkpoint_eval import evaluate_perplexity
from rayquant.workers.evaluation import perplexity, window_nll

from .models import SPEC, dequantized_model, fp_model, logits, rtn_model, run_cli
from .trained_model import trained_llama_tiny

pytestmark = pytest.mark.slow

EVAL_ARGS = ("--seq-len", "256", "--eval-samples", "8")  # tiny-llama.yaml's calibration settings
LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def trained_dir() -> Path:
    return trained_llama_tiny()


@pytest.fixture(scope="module")
def eval_ids(trained_dir) -> torch.Tensor:
    return load_calibration("builtin://text", trained_dir, 32, 256, 8, 0).eval_samples


@pytest.fixture(scope="module")
def quantized(trained_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "out"
    proc = run_cli("quantize", str(SPEC), "--set", f"model.source={trained_dir}", "--set", f"output.uri={out}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="module")
def quantized_eval(quantized) -> dict:
    return eval_cli(quantized)


@pytest.fixture(scope="module", autouse=True)
def fp_eval_in_background(trained_dir, request) -> Iterator[Future | None]:
    """With the module's first test, start the eval of the unquantized source if a selected test reads it: it
    runs beside the quantize job (one CLI process alone leaves the 2 cores half idle)."""
    if not any("fp_eval" in item.fixturenames for item in request.session.items if item.module is request.module):
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="fp-eval") as pool:
        yield pool.submit(eval_cli, trained_dir)  # the same function on the unquantized source


@pytest.fixture(scope="module")
def fp_eval(fp_eval_in_background) -> dict:
    return fp_eval_in_background.result()


def eval_cli(uri: Path | str, *extra: str) -> dict:
    """`rayquant eval` as a user runs it; its last stdout line, parsed."""
    proc = run_cli("eval", str(uri), *EVAL_ARGS, *extra)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval_progress" in proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def eval_main(capsys, uri: Path | str) -> dict:
    """The same command through the CLI's main() in this process (no interpreter start, no imports: seconds
    less per checkpoint); the fixtures above run it as a user does."""
    capsys.readouterr()
    assert main(["eval", str(uri), *EVAL_ARGS]) == 0
    captured = capsys.readouterr()
    assert "eval_progress" in captured.err
    return json.loads(captured.out.strip().splitlines()[-1])


def ppl_of_logits(logits_: torch.Tensor, ids: torch.Tensor) -> float:
    return perplexity(*window_nll(logits_, ids))


def test_eval_of_rayquant_output_lies_between_fp_and_rtn(quantized_eval, fp_eval, trained_dir, eval_ids):
    gptq, fp = quantized_eval, fp_eval
    rtn = evaluate_perplexity(rtn_model(trained_dir, GPTQConfig(bits=4, group_size=128, sym=True)), eval_ids).ppl

    assert gptq["quantized_linears"] == 28 and fp["quantized_linears"] == 0
    assert gptq["n_tokens"] == fp["n_tokens"] == 8 * 255
    windows_sha256 = hashlib.sha256(eval_ids.numpy().tobytes()).hexdigest()
    assert gptq["windows_sha256"] == fp["windows_sha256"] == windows_sha256
    assert math.isfinite(gptq["ppl"])
    assert fp["ppl"] < gptq["ppl"] < rtn, (fp["ppl"], gptq["ppl"], rtn)
    assert gptq["ppl"] < 1.1 * fp["ppl"]


def test_in_pass_perplexities_equal_a_separate_eval_of_the_output(quantized, quantized_eval, fp_eval):
    in_pass = json.loads((quantized / "report.json").read_text())["eval"]
    fp = fp_eval
    assert in_pass["windows_sha256"] == quantized_eval["windows_sha256"]
    assert in_pass["n_tokens"] == quantized_eval["n_tokens"]
    assert in_pass["gptq_ppl"] == pytest.approx(quantized_eval["ppl"], rel=1e-5)
    assert in_pass["fp_ppl"] == pytest.approx(fp["ppl"], rel=1e-5)


def test_eval_reads_the_weights_the_independent_loader_reads(quantized, quantized_eval, trained_dir, eval_ids):
    from .gptq_loader import load_gptq_logits

    ours = quantized_eval["ppl"]
    reference = ppl_of_logits(logits(dequantized_model(trained_dir, quantized), eval_ids), eval_ids)
    loaded = ppl_of_logits(load_gptq_logits(quantized, eval_ids, bits=4), eval_ids)
    assert ours == pytest.approx(reference, rel=1e-6)
    # GPTQModel's kernel forms the weights in float16: ~5e-4 relative per weight, far less in ppl
    assert ours == pytest.approx(loaded, rel=1e-3)


def test_eval_of_a_gptqmodel_checkpoint_agrees_with_the_independent_loader(trained_dir, eval_ids, tmp_path, capsys):
    from .gptq_loader import load_gptq_logits
    from .gptqmodel_quantize import quantize_with_gptqmodel

    out = tmp_path / "gptqmodel"
    samples = load_calibration("builtin://text", trained_dir, 32, 256, 8, 0).samples
    quantize_with_gptqmodel(trained_dir, samples, out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["meta"]["quantizer"][0].startswith("gptqmodel:") and qc["checkpoint_format"] == "gptq"

    ours = eval_main(capsys, out)
    loaded = ppl_of_logits(load_gptq_logits(out, eval_ids, bits=4), eval_ids)
    fp = evaluate_perplexity(fp_model(trained_dir), eval_ids).ppl
    assert ours["quantized_linears"] == 28
    assert ours["ppl"] == pytest.approx(loaded, rel=1e-3)
    assert fp < ours["ppl"] < 1.1 * fp


# --- checkpoints other tools write: dynamic per-module settings, tied embeddings -------------------

def _rewrite(checkpoint: Path, dest: Path, edit_tensors=None, edit_qc=None) -> Path:
    """A copy of `checkpoint` as one model.safetensors, with its tensors and quantization_config edited."""
    shutil.copytree(checkpoint, dest)
    index = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        tensors.update(load_file(dest / shard))
        (dest / shard).unlink()
    (dest / "model.safetensors.index.json").unlink()
    (dest / "rayquant-manifest.json").unlink()
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((dest / "config.json").read_text())
    if edit_qc:
        edit_qc(config["quantization_config"])
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def _repack_at_8_bits(tensors: dict) -> None:
    """LAYER's 4-bit codes and zero points stored as 8-bit values: the same weights, another bit width."""
    u = unpack_linear(PackedLinear(**{f: tensors[f"{LAYER}.{f}"] for f in PACKED_FIELDS}), 4)
    tensors[f"{LAYER}.qweight"] = pack_qweight(u.codes, 8)
    tensors[f"{LAYER}.qzeros"] = pack_qzeros(u.zeros, 8)


def _unquantize(tensors: dict) -> None:
    packed = PackedLinear(**{f: tensors.pop(f"{LAYER}.{f}") for f in PACKED_FIELDS})
    tensors[f"{LAYER}.weight"] = dequantize_packed(packed, 4).contiguous()


def test_dynamic_overrides_set_bits_per_module_or_leave_it_unquantized(quantized, quantized_eval, tmp_path, capsys):
    baseline = quantized_eval
    pattern = r"model\.layers\.0\.mlp\.down_proj"
    eight_bit = _rewrite(quantized, tmp_path / "8bit", _repack_at_8_bits,
                         lambda qc: qc.update(dynamic={f"+:{pattern}": {"bits": 8}}))
    plain = _rewrite(quantized, tmp_path / "plain", _unquantize,
                     lambda qc: qc.update(dynamic={f"-:{pattern}": {}}))

    assert eval_main(capsys, eight_bit)["ppl"] == pytest.approx(baseline["ppl"], rel=1e-9)
    skipped = eval_main(capsys, plain)
    assert skipped["quantized_linears"] == 27 and skipped["ppl"] == pytest.approx(baseline["ppl"], rel=1e-9)


def test_autogptq_quantize_config_json_beside_a_plain_config_is_read(quantized, quantized_eval, tmp_path, capsys):
    legacy = _rewrite(quantized, tmp_path / "legacy")
    config = json.loads((legacy / "config.json").read_text())
    (legacy / "quantize_config.json").write_text(json.dumps(config.pop("quantization_config")))
    (legacy / "config.json").write_text(json.dumps(config))
    result = eval_main(capsys, legacy)
    assert result["quantized_linears"] == 28 and result["ppl"] == pytest.approx(quantized_eval["ppl"], rel=1e-9)


def test_tied_embeddings_are_read_as_transformers_reads_them(trained_dir, eval_ids, tmp_path, capsys):
    tied = shutil.copytree(trained_dir, tmp_path / "tied")
    tensors = load_file(tied / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, tied / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((tied / "config.json").read_text())
    (tied / "config.json").write_text(json.dumps({**config, "tie_word_embeddings": True}))

    ours = eval_main(capsys, tied)["ppl"]
    theirs = evaluate_perplexity(fp_model(tied), eval_ids).ppl
    untied = evaluate_perplexity(fp_model(trained_dir), eval_ids).ppl
    assert ours == pytest.approx(theirs, rel=1e-6) and abs(ours - untied) > 1e-3 * untied


# --- bad input: a typed error naming the fix, exit code 2, no traceback ----------------------------

def _expect_bad_input(argv: list[str], capsys, error: str, fix: str) -> None:
    assert main(["eval", *argv, *EVAL_ARGS]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and f"error: {error}:" in err and fix in err, err[-2000:]


def _drop_scales(tensors: dict) -> None:
    del tensors[f"{LAYER}.scales"]


def _nan_scale(tensors: dict) -> None:
    tensors[f"{LAYER}.scales"][0, 3] = float("nan")


@pytest.mark.parametrize(
    "edit_tensors, edit_qc, error, fix",
    [
        (_drop_scales, None, "InvalidGPTQCheckpoint", f"{LAYER} has a qweight but no scales"),
        (_nan_scale, None, "NonFiniteWeights", "quantize the model again or re-download"),
        (None, lambda qc: qc.update(checkpoint_format="gptq_v2"), "UnsupportedCheckpointFormat",
         "reads GPTQ v1 checkpoints"),
        (None, lambda qc: qc.update(quant_method="awq"), "UnsupportedCheckpointFormat", "convert it to GPTQ v1"),
        (_repack_at_8_bits, None, "InvalidGPTQCheckpoint", "add a dynamic override for this module"),
    ],
    ids=["qweight-without-scales", "nan-scales", "gptq-v2", "awq", "bits-disagree-with-config"],
)
def test_damaged_or_foreign_checkpoint_is_refused(quantized, tmp_path, capsys, edit_tensors, edit_qc, error, fix):
    bad = _rewrite(quantized, tmp_path / "bad", edit_tensors, edit_qc)
    _expect_bad_input([str(bad)], capsys, error, fix)


def test_missing_or_truncated_shard_is_refused(quantized, tmp_path, capsys):
    missing = shutil.copytree(quantized, tmp_path / "missing")
    shard = sorted(missing.glob("model-*.safetensors"))[0]
    shard.unlink()
    _expect_bad_input([str(missing)], capsys, "ModelNotFound", f"names shards that are missing: {shard.name}")

    truncated = shutil.copytree(quantized, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:-1000])
    _expect_bad_input([str(truncated)], capsys, "CorruptSafetensors", "the file is truncated")


def test_checkpoint_without_tokenizer_names_the_tokenizer_flag(quantized, trained_dir, tmp_path, capsys):
    bare = shutil.copytree(quantized, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    _expect_bad_input([str(bare)], capsys, "TokenizerNotFound", "pass --tokenizer DIR")
    assert main(["eval", str(bare), "--tokenizer", str(trained_dir), *EVAL_ARGS]) == 0


def test_eval_needs_at_least_one_window(quantized, capsys):
    assert main(["eval", str(quantized), "--eval-samples", "0"]) == 2
    assert "--eval-samples=0: use at least 1" in capsys.readouterr().err

"""Staging, block parts, markers and checkpoint assembly on real safetensors files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayquant.storage.checkpoint import (
    MANIFEST_FILE,
    STAGING,
    BlockPartMismatch,
    OutputConflict,
    OutputState,
    StagingIncomplete,
    assemble_checkpoint,
    begin_staging,
    discard_staging,
    gptq_quantization_config,
    inspect_output,
    mark_block_done,
    read_block_layers,
    read_block_part,
    write_block_part,
)
from rayquant.storage.model_source import ModelSource, open_model_source, read_source_tensor

N_BLOCKS = 2
HIDDEN, VOCAB = 32, 64
FINGERPRINT = "f" * 64
SPEC = {"name": "tiny-w4g16", "model": {"source": "/models/tiny"}, "quant": {"bits": 4, "group_size": 16}}
QUANT_CONFIG = gptq_quantization_config(
    bits=4, group_size=16, desc_act=False, sym=True, damp_percent=0.01, true_sequential=True, static_groups=False
)
REPORT = {
    "layers": [
        {"name": f"model.layers.{b}.{layer}", "gptq_loss": 0.5 + b, "rtn_loss": 2.0 + b, "damp_percent": 0.01}
        for b in range(N_BLOCKS)
        for layer in ("self_attn.q_proj", "mlp.down_proj")
    ],
    "metrics": {"perplexity_fp": 11.25, "perplexity_quantized": 11.5},
}
AUX = {"tokenizer.json": b'{"version": "1.0"}\n', "generation_config.json": b'{"bos_token_id": 0}\n'}


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


def _block_part(b: int) -> dict[str, torch.Tensor]:
    """What a worker persists for block b: packed linears, the bias, the unquantized norm."""
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


def _stage_all_blocks(out_dir: Path) -> None:
    begin_staging(out_dir, FINGERPRINT, SPEC)
    for b in range(N_BLOCKS):
        write_block_part(out_dir, b, _block_part(b))
        mark_block_done(out_dir, b)


def _assemble(out_dir: Path, source: ModelSource, max_shard_bytes: int = 4 * 2**30) -> list[str]:
    return assemble_checkpoint(out_dir, source, N_BLOCKS, QUANT_CONFIG, REPORT, SPEC, max_shard_bytes)


def _expected_checkpoint_tensors(source: ModelSource) -> dict[str, torch.Tensor]:
    """Checkpoint tensors in source name order, spelled out: parts for blocks, source for the rest.

    The source's order is its index's: shard 1 (embeddings, block 0) then shard 2 (sorted names).
    """
    parts = {name: t for b in range(N_BLOCKS) for name, t in _block_part(b).items()}
    packed = ("qweight", "qzeros", "scales", "g_idx")

    def block(b: int) -> list[str]:
        p = f"model.layers.{b}"
        return (
            [f"{p}.input_layernorm.weight"] + [f"{p}.mlp.down_proj.{s}" for s in packed]
            + [f"{p}.self_attn.q_proj.bias"] + [f"{p}.self_attn.q_proj.{s}" for s in packed]
        )

    order = ["model.embed_tokens.weight", *block(0), "lm_head.weight", *block(1), "model.norm.weight"]
    return {name: parts[name] if name in parts else read_source_tensor(source, name) for name in order}


def _files_bytes(out_dir: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out_dir.iterdir())}


# --- inspect_output ---------------------------------------------------------------------------


def test_missing_and_empty_output_dirs_are_fresh(tmp_path: Path):
    assert inspect_output(tmp_path / "absent", FINGERPRINT) == OutputState(complete=False, done_blocks=0)
    (tmp_path / "empty").mkdir()
    assert inspect_output(tmp_path / "empty", FINGERPRINT) == OutputState(complete=False, done_blocks=0)
    assert not (tmp_path / "absent").exists() and list((tmp_path / "empty").iterdir()) == []


def test_resume_point_counts_contiguous_markers_from_block_0(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=0)
    for b in (0, 1, 3):
        write_block_part(out, b, _block_part(b % N_BLOCKS))
        mark_block_done(out, b)
    write_block_part(out, 2, _block_part(0))  # part written, crash before its marker
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
    _stage_all_blocks(out)
    _assemble(out, source)
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


# --- staging ----------------------------------------------------------------------------------


def test_begin_staging_is_idempotent_and_records_the_job(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    job_path = out / STAGING / "job.json"
    first = job_path.read_bytes()
    begin_staging(out, FINGERPRINT, SPEC)
    assert job_path.read_bytes() == first
    assert json.loads(first) == {"job_fingerprint": FINGERPRINT, "resolved_spec": SPEC}
    assert sorted(p.name for p in (out / STAGING).iterdir()) == ["job.json"]


def test_block_part_round_trips_values_and_bytes_do_not_depend_on_dict_order(tmp_path: Path):
    part = _block_part(1)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    for out, tensors in ((out_a, part), (out_b, dict(reversed(list(part.items()))))):
        begin_staging(out, FINGERPRINT, SPEC)
        write_block_part(out, 1, tensors)
    read = read_block_part(out_a, 1)
    assert list(read) == sorted(part)
    for name, tensor in part.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    name = "block-00001.safetensors"
    assert (out_a / STAGING / name).read_bytes() == (out_b / STAGING / name).read_bytes()
    assert not any(p.name.startswith(".tmp-") for p in (out_a / STAGING).iterdir())


def test_marker_without_part_and_part_without_staging_are_refused(tmp_path: Path):
    out = tmp_path / "out"
    with pytest.raises(StagingIncomplete) as err:
        write_block_part(out, 0, _block_part(0))
    assert "rerun the job from the start" in str(err.value)
    begin_staging(out, FINGERPRINT, SPEC)
    with pytest.raises(StagingIncomplete) as err:
        mark_block_done(out, 0)
    assert "no part file for block 0" in str(err.value) and "from block 0" in str(err.value)
    with pytest.raises(StagingIncomplete):
        read_block_part(out, 0)
    assert inspect_output(out, FINGERPRINT).done_blocks == 0


def test_marker_keeps_the_block_layer_records_for_resume(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    layers = [layer for layer in REPORT["layers"] if layer["name"].startswith("model.layers.1.")]
    write_block_part(out, 1, _block_part(1))
    mark_block_done(out, 1, layers=layers)
    assert read_block_layers(out, 1) == layers
    write_block_part(out, 0, _block_part(0))
    mark_block_done(out, 0)
    with pytest.raises(StagingIncomplete) as err:
        read_block_layers(out, 0)
    assert "no layer records for block 0" in str(err.value)
    assert inspect_output(out, FINGERPRINT).done_blocks == 2


def test_discard_staging_removes_the_directory_it_created(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    write_block_part(out, 0, _block_part(0))
    discard_staging(out)
    assert not out.exists()
    discard_staging(out)  # nothing left to discard
    assert inspect_output(out, FINGERPRINT) == OutputState(complete=False, done_blocks=0)


def test_discard_staging_keeps_files_it_did_not_write(tmp_path: Path):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    (out / "keep.txt").write_text("x")
    discard_staging(out)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


# --- assembly ---------------------------------------------------------------------------------


def test_assembled_checkpoint_holds_parts_then_source_tensors_in_source_order(tmp_path: Path, source):
    out = tmp_path / "out"
    _stage_all_blocks(out)
    files = _assemble(out, source, max_shard_bytes=6000)

    expected = _expected_checkpoint_tensors(source)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_names = sorted(set(index["weight_map"].values()))
    n_shards = len(shard_names)
    assert n_shards > 2
    assert shard_names == [f"model-{i:05d}-of-{n_shards:05d}.safetensors" for i in range(1, n_shards + 1)]
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in expected.values())
    # shards are filled in source order: the shard number never decreases along the expected order
    shard_of = [shard_names.index(index["weight_map"][name]) for name in expected]
    assert sorted(index["weight_map"]) == sorted(expected) and shard_of == sorted(shard_of)
    loaded = {}
    for shard_name in shard_names:
        shard = load_file(out / shard_name)
        shard_bytes = sum(t.numel() * t.element_size() for t in shard.values())
        assert shard_bytes <= 6000 or len(shard) == 1
        assert all(index["weight_map"][name] == shard_name for name in shard)
        loaded.update(shard)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    # model_source reads the output like any model: index and shards agree
    reopened = open_model_source(str(out))
    assert torch.equal(read_source_tensor(reopened, "lm_head.weight"), read_source_tensor(source, "lm_head.weight"))

    assert files[-1] == MANIFEST_FILE and files[:-1] == sorted(files[:-1])
    assert set(files) == {p.name for p in out.iterdir()} and not (out / STAGING).exists()


def test_tensor_larger_than_max_shard_bytes_gets_a_shard_of_its_own(tmp_path: Path, source):
    out = tmp_path / "out"
    _stage_all_blocks(out)
    embed_bytes = VOCAB * HIDDEN * 2
    _assemble(out, source, max_shard_bytes=embed_bytes - 1)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    first_shard = index["weight_map"]["model.embed_tokens.weight"]
    assert first_shard.startswith("model-00001-of-")
    assert [n for n, f in index["weight_map"].items() if f == first_shard] == ["model.embed_tokens.weight"]


def test_config_aux_files_report_and_model_card(tmp_path: Path, source):
    out = tmp_path / "out"
    _stage_all_blocks(out)
    _assemble(out, source)
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
    _stage_all_blocks(out)
    _assemble(out, source, max_shard_bytes=6000)
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert manifest["job_fingerprint"] == FINGERPRINT and manifest["n_blocks"] == N_BLOCKS
    assert manifest["resolved_spec"] == SPEC and manifest["source_revision"] == source.revision
    listed = {entry["path"]: entry for entry in manifest["files"]}
    assert set(listed) == {p.name for p in out.iterdir()} - {MANIFEST_FILE}
    for name, entry in listed.items():
        data = (out / name).read_bytes()
        assert entry == {"path": name, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}


def test_identical_inputs_give_byte_identical_checkpoints_also_after_an_interrupted_assembly(tmp_path: Path, source):
    first, second = tmp_path / "first", tmp_path / "second"
    _stage_all_blocks(first)
    _assemble(first, source, max_shard_bytes=6000)
    _stage_all_blocks(second)
    # an earlier assembly attempt under another shard size died after writing a shard and the config
    (second / "model-00001-of-00009.safetensors").write_bytes(b"stale")
    (second / "config.json").write_text("{}")
    assert inspect_output(second, FINGERPRINT) == OutputState(complete=False, done_blocks=N_BLOCKS)
    _assemble(second, source, max_shard_bytes=6000)
    assert _files_bytes(first) == _files_bytes(second)


def test_assembly_before_every_block_is_marked_names_the_resume_block(tmp_path: Path, source):
    out = tmp_path / "out"
    begin_staging(out, FINGERPRINT, SPEC)
    write_block_part(out, 0, _block_part(0))
    mark_block_done(out, 0)
    write_block_part(out, 1, _block_part(1))
    with pytest.raises(StagingIncomplete) as err:
        _assemble(out, source)
    assert "block 1 of 2 has no marker" in str(err.value) and "resume from block 1" in str(err.value)
    assert not (out / MANIFEST_FILE).exists()


def test_part_missing_a_block_tensor_is_refused(tmp_path: Path, source):
    out = tmp_path / "out"
    _stage_all_blocks(out)
    part = _block_part(1)
    del part["model.layers.1.input_layernorm.weight"]
    write_block_part(out, 1, part)
    with pytest.raises(BlockPartMismatch) as err:
        _assemble(out, source)
    assert "lacks source tensor model.layers.1.input_layernorm.weight" in str(err.value)
    assert not (out / MANIFEST_FILE).exists() and (out / STAGING).is_dir()


def test_part_with_half_a_packed_linear_or_a_stray_tensor_is_refused(tmp_path: Path, source):
    out = tmp_path / "out"
    _stage_all_blocks(out)
    part = _block_part(0)
    del part["model.layers.0.mlp.down_proj.scales"]
    write_block_part(out, 0, part)
    with pytest.raises(BlockPartMismatch) as err:
        _assemble(out, source)
    assert "has model.layers.0.mlp.down_proj.qweight but lacks model.layers.0.mlp.down_proj.scales" in str(err.value)

    write_block_part(out, 0, {**_block_part(0), "model.layers.0.extra.weight": torch.zeros(2)})
    with pytest.raises(BlockPartMismatch) as err:
        _assemble(out, source)
    assert "model.layers.0.extra.weight, which matches no tensor of the source" in str(err.value)


def test_quantization_config_with_other_keys_is_refused(tmp_path: Path, source):
    out = tmp_path / "out"
    _stage_all_blocks(out)
    with pytest.raises(ValueError) as err:
        assemble_checkpoint(out, source, N_BLOCKS, {**QUANT_CONFIG, "format": "gptq"}, REPORT, SPEC)
    assert "extra ['format']" in str(err.value)

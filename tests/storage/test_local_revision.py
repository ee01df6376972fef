"""A local model directory's revision follows its weights, not only its headers: the revision names the
job (fingerprint, job id, reconcile's "new revision?"), so new weights under the same header must change it."""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from rayquant.storage.model_source import open_model_source
from rayquant.storage.safetensors_reader import read_safetensors_header_json


def test_new_weights_under_an_identical_header_are_a_new_revision_and_a_copy_is_not(tmp_path):
    source = open_model_source("synthetic://llama-tiny").path
    model = shutil.copytree(source, tmp_path / "model")
    before = open_model_source(str(model)).revision
    assert open_model_source(str(shutil.copytree(model, tmp_path / "copy"))).revision == before

    shard = sorted(model.glob("*.safetensors"))[-1]  # any one shard
    header = read_safetensors_header_json(shard)
    tensors = load_file(shard)
    save_file({k: v + 1e-3 if v.is_floating_point() else v for k, v in tensors.items()}, shard,
              metadata={"format": "pt"})  # a fine-tune saved again: the same names, dtypes, shapes, offsets
    assert read_safetensors_header_json(shard) == header and load_file(shard).keys() == tensors.keys()
    assert open_model_source(str(model)).revision != before

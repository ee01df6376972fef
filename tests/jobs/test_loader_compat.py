"""Loader compatibility at spec time: a checkpoint no loader reads is refused, one some cannot read warns."""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import pytest

from rayquant.jobs.loader_compat import LOADERS, loader_warnings
from rayquant.jobs.spec import SpecError, load_spec

REPO = Path(__file__).resolve().parents[2]
VLLM_QUANT = REPO / ".venv-vllm/lib/python3.11/site-packages/vllm/model_executor/layers/quantization"
GPTQMODEL, VLLM = LOADERS


@pytest.mark.parametrize("sets, nearest", [
    (["quant.group_size=100"], 128),
    (["quant.group_size=20"], 16),
    (["quant.group_size=4096"], 1024),
    (["quant.group_size=48", "quant.bits=8"], 64),  # as far from 32 as from 64: the larger (fewer scales)
])
def test_group_size_no_loader_reads_is_refused_naming_loaders_and_nearest_value(sets: list[str], nearest: int):
    with pytest.raises(SpecError) as err:
        load_spec(None, sets)
    message = str(err.value)
    assert "make a checkpoint no supported loader can read" in message
    assert "GPTQModel/transformers needs group_size in {-1, 16, 32, 64, 128, 256, 512, 1024}" in message
    assert "vLLM needs group_size in {-1, 32, 64, 128}" in message
    assert message.endswith(f"the nearest group_size a loader reads is {nearest}")


def test_an_override_no_loader_reads_is_refused_naming_the_rule():
    with pytest.raises(SpecError) as err:
        load_spec(None, [r"quant.overrides=[{pattern: '.*\.mlp\.down_proj', group_size: 100}]"])
    assert r"(quant.overrides[0] '.*\\.mlp\\.down_proj') make a checkpoint no supported loader can read" in str(err.value)


@pytest.mark.parametrize("sets", [
    [], ["quant.bits=8"], ["quant.group_size=-1"], ["quant.group_size=32"], ["quant.group_size=64"],
    ["quant.desc_act=true", "quant.group_size=-1"],  # vLLM reads act-order without groups as plain
    ["quant.overrides=[{pattern: x, skip: true}]"],
])
def test_settings_every_loader_reads_give_no_warning(sets: list[str]):
    assert loader_warnings(load_spec(None, sets)) == []


@pytest.mark.parametrize("sets, expected", [
    (["quant.bits=3"], ["bits=3, group_size=128, sym=True, desc_act=False (base settings): readable by "
                        "GPTQModel/transformers but not by vLLM (needs bits in {4, 8})"]),
    (["quant.desc_act=true"], ["bits=4, group_size=128, sym=True, desc_act=True (base settings): readable by "
                               "GPTQModel/transformers but not by vLLM (needs desc_act: false (or group_size -1))"]),
    (["quant.sym=false", "quant.group_size=256"],
     ["bits=4, group_size=256, sym=False, desc_act=False (base settings): readable by GPTQModel/transformers but "
      "not by vLLM (needs group_size in {-1, 32, 64, 128}, sym: true)"]),
    (["quant.overrides=[{pattern: x, bits: 2}, {pattern: y, bits: 8}]"],
     ["bits=2, group_size=128, sym=True, desc_act=False (quant.overrides[0] 'x'): readable by "
      "GPTQModel/transformers but not by vLLM (needs bits in {4, 8})"]),
])
def test_settings_only_some_loaders_read_are_accepted_with_a_warning(sets: list[str], expected: list[str]):
    assert loader_warnings(load_spec(None, sets)) == expected


def _class_attr(path: Path, cls: str, attr: str) -> object:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == cls:
            for item in node.body:
                if isinstance(item, ast.Assign) and any(getattr(t, "id", None) == attr for t in item.targets):
                    return ast.literal_eval(item.value)
    raise LookupError(f"{cls}.{attr} not in {path}")


def _module_value(path: Path, name: str) -> object:
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return ast.literal_eval(node.value)
    raise LookupError(f"{name} not in {path}")


def test_gptqmodel_sets_match_the_installed_torch_kernel():
    spec = importlib.util.find_spec("gptqmodel")
    if spec is None:
        pytest.skip("GPTQModel is not installed here")
    torch_kernel = Path(spec.origin).parent / "nn_modules" / "qlinear" / "torch.py"
    assert set(_class_attr(torch_kernel, "TorchLinear", "SUPPORTS_BITS")) == GPTQMODEL.bits
    assert set(_class_attr(torch_kernel, "TorchLinear", "SUPPORTS_GROUP_SIZE")) == GPTQMODEL.group_sizes
    assert _class_attr(torch_kernel, "TorchLinear", "SUPPORTS_SYM") == [True, False]
    assert _class_attr(torch_kernel, "TorchLinear", "SUPPORTS_DESC_ACT") == [True, False]


def test_vllm_sets_match_its_gptq_marlin_source():
    if not VLLM_QUANT.is_dir():
        pytest.skip("no vLLM in .venv-vllm")
    assert set(_module_value(VLLM_QUANT / "utils" / "marlin_utils.py", "MARLIN_SUPPORTED_GROUP_SIZES")) == VLLM.group_sizes
    auto_gptq = (VLLM_QUANT / "auto_gptq.py").read_text()
    assert "(4, True): scalar_types.uint4b8" in auto_gptq and "(8, True): scalar_types.uint8b128" in auto_gptq
    assert "(4, False)" not in auto_gptq and VLLM.bits == {4, 8} and not VLLM.asym
    desc_act_rule = (VLLM_QUANT / "utils" / "gptq_utils.py").read_text()
    assert "if desc_act and group_size == -1:" in desc_act_rule and not VLLM.desc_act_with_groups

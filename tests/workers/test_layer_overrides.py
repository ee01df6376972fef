"""quant.overrides resolution: first match wins, the dynamic map loaders read, and the preflight checks."""

import pytest

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.layer_overrides import (
    LayerOverride,
    OverrideMatchesNothing,
    OverridesSplitFusedLayer,
    check_fused_units,
    check_overrides_match,
    gptq_dynamic,
    layer_config,
)

BASE = GPTQConfig(bits=4, group_size=128)
NAMES = [f"model.layers.{b}.{m}" for b in range(2) for m in (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")]


def test_first_matching_rule_wins_and_unmatched_layers_keep_the_base_config():
    rules = (LayerOverride(r"model\.layers\.1\.mlp\.down_proj", skip=True),
             LayerOverride(r".*\.down_proj", bits=8),
             LayerOverride(r".*\.mlp\.", group_size=32))
    assert layer_config("model.layers.1.mlp.down_proj", BASE, rules) is None
    assert layer_config("model.layers.0.mlp.down_proj", BASE, rules) == GPTQConfig(bits=8, group_size=128)
    assert layer_config("model.layers.0.mlp.up_proj", BASE, rules) == GPTQConfig(bits=4, group_size=32)
    assert layer_config("model.layers.0.self_attn.o_proj", BASE, rules) is BASE
    # matched from the start of the name, as GPTQModel and vLLM match (re.match, not re.search)
    assert layer_config("model.layers.0.mlp.down_proj", BASE, (LayerOverride("down_proj", bits=8),)) is BASE


def test_dynamic_map_is_gptqmodels_format_in_rule_order():
    rules = (LayerOverride(r"model\.layers\.1\.self_attn\.o_proj", skip=True),
             LayerOverride(r".*\.down_proj", bits=8, group_size=64),
             LayerOverride(r".*\.up_proj", group_size=32))
    dynamic = gptq_dynamic(rules)
    assert list(dynamic) == [r"-:model\.layers\.1\.self_attn\.o_proj", r"+:.*\.down_proj", r"+:.*\.up_proj"]
    assert dynamic[r"+:.*\.down_proj"] == {"bits": 8, "group_size": 64}
    assert dynamic[r"+:.*\.up_proj"] == {"group_size": 32}
    assert dynamic[r"-:model\.layers\.1\.self_attn\.o_proj"] == {}
    assert gptq_dynamic(()) == {}


def test_pattern_matching_no_linear_names_the_fix():
    check_overrides_match((LayerOverride(r".*\.down_proj", bits=8),), NAMES)
    with pytest.raises(OverrideMatchesNothing, match=r"overrides\[1\].pattern 'mlp.fc1'.*model\.layers\.0"):
        check_overrides_match((LayerOverride(r".*\.down_proj", bits=8), LayerOverride("mlp.fc1", bits=8)), NAMES)


def test_rules_splitting_a_layer_vllm_fuses_are_rejected():
    check_fused_units((LayerOverride(r".*\.down_proj", bits=8), LayerOverride(r".*\.o_proj", skip=True)), BASE, NAMES)
    check_fused_units((LayerOverride(r".*\.(q|k|v|qkv)_proj$", bits=8),), BASE, NAMES)
    with pytest.raises(OverridesSplitFusedLayer, match=r"self_attn\.qkv_proj.*one pattern covering all"):
        check_fused_units((LayerOverride(r".*\.(q|k|v)_proj", bits=8),), BASE, NAMES)
    with pytest.raises(OverridesSplitFusedLayer, match=r"mlp\.gate_up_proj.*'up_proj': 'skip'"):
        check_fused_units((LayerOverride(r".*\.up_proj", skip=True),), BASE, NAMES)

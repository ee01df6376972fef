"""quant.moe: the example spec parses; a bad policy or threshold names the field and the choices."""

import pytest

from rayquant.jobs.spec import SpecError, load_spec
from tests.e2e.models import REPO


def test_mixtral_example_spec_sets_the_starved_expert_policy():
    spec = load_spec(REPO / "jobs" / "specs" / "tiny-mixtral.yaml", ["quant.moe.starved_experts=rtn"])
    assert (spec.quant.moe.min_tokens, spec.quant.moe.starved_experts) == (1, "rtn")
    assert spec.resolved()["quant"]["moe"] == {"min_tokens": 1, "starved_experts": "rtn", "hessian_tokens": "routed"}


@pytest.mark.parametrize("override, message", [
    ("quant.moe.starved_experts=skip", "quant.moe.starved_experts: Input should be 'error', 'calibrate_all' or 'rtn'"),
    ("quant.moe.min_tokens=0", "quant.moe.min_tokens: Input should be greater than or equal to 1"),
    ("quant.moe.hessian_tokens=some", "quant.moe.hessian_tokens: Input should be 'all' or 'routed'"),
    ("quant.moe.experts=8", "quant.moe.experts: unknown key"),
])
def test_bad_moe_settings_name_the_field(override, message):
    with pytest.raises(SpecError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_spec(None, [override])

"""solve_gptq against the textbook algorithm (tests/solver/textbook_gptq.py) and against RTN.

In float64 the two must choose the same codes. In float32 (production precision) the codes are
not comparable (each rounding error feeds forward along its row, so a roundoff-level difference
re-routes the rest of a row), but the layer loss is: it must stay within 0.1 % of the textbook's.
That agreement is statistical, hence 512 rows: rerouted rows are few and average out.
"""

import itertools

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig, GPTQResult, solve_gptq
from rayquant.solver.rtn import quantize_rtn
from tests.solver.calibration_cases import LayerCase, textbook_layer, textbook_result
from tests.solver.textbook_gptq import TextbookResult

ALL_BITS = (2, 3, 4, 8)


def all_pairs(options: dict[str, tuple], valid=lambda combo: True) -> list[dict]:
    """Valid combinations of the options in which every pair of values of two options occurs at least once
    (every valid pair): each option's effect and each two options' interplay, without the whole product.
    Greedy: repeatedly take the combination covering the most pairs not yet covered (ties: product order)."""
    names = list(options)
    combos = [dict(zip(names, values, strict=True)) for values in itertools.product(*options.values())]
    combos = [c for c in combos if valid(c)]

    def pairs(combo: dict) -> set:
        return {((a, combo[a]), (b, combo[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(c) for c in combos))
    chosen = []
    while uncovered:
        best = max(combos, key=lambda c: len(pairs(c) & uncovered))
        chosen.append(best)
        uncovered -= pairs(best)
    return chosen


# every option value and every pair of them; the whole product (120 combinations) is in FULL_MATRIX
DYNAMIC = all_pairs(dict(bits=ALL_BITS, group_size=(-1, 32, 128), desc_act=(False, True), sym=(False, True)))
STATIC = [dict(c, static_groups=True)
          for c in all_pairs(dict(bits=ALL_BITS, group_size=(32, 128), desc_act=(False, True), sym=(False, True)))]
# group-aware act-order (GAR); group size 96 of 256 in_features leaves a partial group, which must stay last
GAR = [dict(c, act_group_aware=True)
       for c in all_pairs(dict(bits=ALL_BITS, group_size=(-1, 32, 96), sym=(False, True), static_groups=(False, True)),
                          valid=lambda c: c["group_size"] != -1 or not c["static_groups"])]
FULL_MATRIX = (
    [dict(bits=b, group_size=g, desc_act=a, sym=s)
     for b, g, a, s in itertools.product(ALL_BITS, (-1, 32, 128), (False, True), (False, True))]
    + [dict(bits=b, group_size=g, desc_act=a, sym=s, static_groups=True)
       for b, g, a, s in itertools.product(ALL_BITS, (32, 128), (False, True), (False, True))]
    + [dict(bits=b, group_size=g, act_group_aware=True, sym=s, static_groups=st)
       for b, g, s, st in itertools.product(ALL_BITS, (-1, 32, 96), (False, True), (False, True)) if g != -1 or not st]
)


def _id(params: dict) -> str:
    return "-".join(f"{k}={v}" for k, v in params.items())


OUT_FEATURES = 512


def _layer() -> LayerCase:
    return textbook_layer(OUT_FEATURES)


def _textbook(cfg: GPTQConfig) -> TextbookResult:
    return textbook_result(cfg, OUT_FEATURES)


def _solve(cfg: GPTQConfig, dtype: torch.dtype) -> GPTQResult:
    layer = _layer()
    return solve_gptq(layer.weight.to(dtype), layer.hessian_sum, layer.n_tokens, cfg)


def _assert_same_as_textbook_in_float64(cfg: GPTQConfig) -> None:
    textbook = _textbook(cfg)
    exact = _solve(cfg, torch.float64)
    same_codes = (exact.codes.long() == textbook.codes).double().mean().item()
    assert same_codes >= 0.999, f"only {same_codes:.4%} of codes equal the textbook's"
    assert torch.equal(exact.g_idx.long(), textbook.g_idx)
    same_scales = (exact.scales.double() == textbook.scales).double().mean().item()
    assert same_scales >= 0.999
    assert exact.loss == pytest.approx(textbook.loss, rel=1e-6)


def _assert_production_loss_near_textbook_and_below_rtn(cfg: GPTQConfig) -> None:
    layer = _layer()
    textbook = _textbook(cfg)
    production = _solve(cfg, torch.float32)
    assert abs(production.loss - textbook.loss) <= 1e-3 * textbook.loss, (production.loss, textbook.loss)
    rtn = quantize_rtn(layer.weight, layer.hessian_sum, layer.n_tokens, cfg)
    assert production.loss < rtn.loss


@pytest.mark.parametrize("params", DYNAMIC + STATIC + GAR, ids=_id)
def test_float64_codes_equal_textbook_gptq(params: dict) -> None:
    _assert_same_as_textbook_in_float64(GPTQConfig(**params))


@pytest.mark.parametrize("params", DYNAMIC + STATIC + GAR, ids=_id)
def test_float32_loss_within_0p1_percent_of_textbook_and_below_rtn(params: dict) -> None:
    _assert_production_loss_near_textbook_and_below_rtn(GPTQConfig(**params))


@pytest.mark.full_matrix
@pytest.mark.parametrize("params", [p for p in FULL_MATRIX if p not in DYNAMIC + STATIC + GAR], ids=_id)
def test_float64_codes_equal_textbook_gptq_in_every_other_combination(params: dict) -> None:
    """The rest of the product (`pytest -m full_matrix`): for a change to the grid or the column loop."""
    _assert_same_as_textbook_in_float64(GPTQConfig(**params))


def test_all_pairs_covers_every_pair_of_option_values_with_fewer_combinations() -> None:
    options = dict(bits=ALL_BITS, group_size=(-1, 32, 128), desc_act=(False, True), sym=(False, True))
    chosen = all_pairs(options)
    for (a, values_a), (b, values_b) in itertools.combinations(options.items(), 2):
        for va, vb in itertools.product(values_a, values_b):
            assert any(c[a] == va and c[b] == vb for c in chosen), (a, va, b, vb)
    assert len(chosen) < len(list(itertools.product(*options.values())))


@pytest.mark.parametrize("params", [
    dict(bits=4, group_size=32, desc_act=True, column_batch=20),    # groups straddle column batches
    dict(bits=3, group_size=128, desc_act=False, sym=False, column_batch=48),
    dict(bits=2, group_size=-1, desc_act=True, column_batch=100),    # the last batch is partial
    dict(bits=4, group_size=96, desc_act=True, column_batch=1),      # last group partial (256 = 2·96 + 64)
], ids=_id)
def test_result_does_not_depend_on_column_batch(params: dict) -> None:
    cfg = GPTQConfig(**params)
    _assert_same_as_textbook_in_float64(cfg)
    exact = _solve(cfg, torch.float64)
    unbatched = _solve(GPTQConfig(**{**params, "column_batch": 256}), torch.float64)
    assert torch.equal(exact.codes, unbatched.codes)
    assert torch.equal(exact.scales, unbatched.scales)


def test_act_order_lowers_the_loss_on_outlier_channels() -> None:
    plain = _solve(GPTQConfig(bits=4, group_size=128), torch.float32)
    act_order = _solve(GPTQConfig(bits=4, group_size=128, desc_act=True), torch.float32)
    assert act_order.loss < 0.9 * plain.loss

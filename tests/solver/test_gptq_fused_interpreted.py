"""The fused Triton column loop (solver/gptq_fused.py, the CUDA path of solve_gptq) run by Triton's CPU
interpreter (no GPU) on a small layer, N=80 and K=256, against the textbook algorithm
(tests/solver/textbook_gptq.py), as test_gptq_vs_textbook.py checks the torch loop and test_gptq_gpu.py
the compiled kernel: in float64 the same codes, scales and loss; in float32 the loss within 0.1 % of the
textbook's (codes are chaotic across precisions, DESIGN.md §12); in both the codes, scales and zeros
decode to a weight whose loss is the one the kernel's error sums report.

The runner forces `solve_gptq` onto the fused path for CPU tensors (`gptq._runs_fused`), so the whole
CUDA solve runs: R from the reversed factor, grids in the kernel, before it (groups wider than a batch)
or static, act-order and GAR permutations, the lazy update between spans. It raises the rows per program
from 16 to 64 (32 in float64): the interpreter's cost is per program and column, not per row; 80 rows
still leave a ragged last program. The interpreter must be switched on before triton is imported, so its
runs happen in a subprocess:

    TRITON_INTERPRET=1 python -m tests.solver.test_gptq_fused_interpreted OUT.pt RUN   (a key of RUNS)
"""

import sys

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig, dequantize, solve_input_group
from rayquant.solver.rtn import quantize_rtn
from tests.kernels.interpreted_kernel_runs import patch_interpreter, run_interpreted
from tests.solver.calibration_cases import LayerCase, textbook_layer, textbook_result
from tests.solver.test_gptq_vs_textbook import _id
from tests.solver.textbook_gptq import TextbookResult

# every kernel variant once or twice: grids in the kernel (group_size <= 128: 128, 32, and 96 with a partial
# last group), before the launch (group_size -1: wider than a batch), static; sym and asym; 3, 4 and 8 bits;
# plain order, act-order and GAR
CASES = [dict(bits=4, group_size=128, desc_act=False, sym=True),
         dict(bits=4, group_size=128, desc_act=True, sym=False),
         dict(bits=8, group_size=128, desc_act=False, sym=False),
         dict(bits=4, group_size=32, desc_act=False, sym=False),
         dict(bits=8, group_size=32, desc_act=True, sym=True),
         dict(bits=3, group_size=32, desc_act=True, sym=False),
         dict(bits=4, group_size=-1, desc_act=True, sym=True),
         dict(bits=8, group_size=-1, desc_act=False, sym=False),
         dict(bits=4, group_size=32, desc_act=True, sym=True, static_groups=True),
         dict(bits=8, group_size=128, desc_act=True, sym=False, static_groups=True),
         dict(bits=4, group_size=128, act_group_aware=True, sym=True),  # GAR, as the job spec's default
         dict(bits=3, group_size=96, act_group_aware=True, sym=False),  # GAR, partial last group
         dict(bits=4, group_size=32, act_group_aware=True, sym=False, static_groups=True)]
# column batches narrower than a group (grids before the launch, one span per group) and groups wider than a
# batch, cut at their starts (the lazy update of later columns between spans); float64 only
COLUMN_BATCH_CASES = [dict(bits=4, group_size=32, desc_act=True, column_batch=20),
                      dict(bits=3, group_size=200, desc_act=True, sym=False, column_batch=128),
                      dict(bits=4, group_size=-1, desc_act=False, sym=False, column_batch=100)]
# float32 checks precision, not the variant's logic (float64 does, in every case): every bits, group size, order
# and grid option once; the other cases' float32 runs are in the full matrix (`pytest -m full_matrix`)
FLOAT32_CASES = [CASES[i] for i in (5, 7, 8, 10, 11)]
FLOAT32_REST = [p for p in CASES if p not in FLOAT32_CASES]
# one interpreter process each, run side by side (the interpreter keeps one core busy), of similar lengths
# solve_input_groups' batches through the kernel: a shared Hessian's groups stacked, distinct Hessians batched
BATCHED_CASES = [dict(bits=4, group_size=128, act_group_aware=True, sym=True),  # grids in the kernel
                 dict(bits=4, group_size=-1, desc_act=True, sym=False)]  # grids before the launch, per problem
RUNS = {"float64": [(p, torch.float64) for p in CASES[:7]],
        "float64_column_batches": [(p, torch.float64) for p in CASES[7:] + COLUMN_BATCH_CASES],
        "float32": [(p, torch.float32) for p in FLOAT32_CASES],
        "float32_rest": [(p, torch.float32) for p in FLOAT32_REST]}
ROWS_PER_PROGRAM = 64  # gptq_fused.BLOCK_ROWS in the interpreter (16 compiled)


OUT_FEATURES = 80  # small for the interpreter; a ragged last program at 64 rows per program


def _layer() -> LayerCase:
    return textbook_layer(OUT_FEATURES)


def _textbook(cfg: GPTQConfig) -> TextbookResult:
    return textbook_result(cfg, OUT_FEATURES)


def main(out_path: str, runs: str) -> None:
    from rayquant.solver import gptq, gptq_fused

    patch_interpreter()
    gptq_fused.BLOCK_ROWS = ROWS_PER_PROGRAM
    gptq._runs_fused = lambda W: True
    fused_calls = []
    column_loop = gptq_fused.quantize_column_batches

    def counted(*args, **kwargs):
        fused_calls.append(1)
        return column_loop(*args, **kwargs)
    gptq_fused.quantize_column_batches = counted  # _solve imports it at each call

    layer = _layer()
    outputs = {}
    if runs.startswith("batched"):
        for params in BATCHED_CASES[:1] if runs == "batched" else BATCHED_CASES[1:]:
            groups = _batched_groups()
            fused_calls.clear()
            together = gptq.solve_input_groups(groups, GPTQConfig(**params))
            outputs[(_id(params), "batched")] = dict(
                together=[[{f: getattr(r, f) for f in ("codes", "scales", "g_idx", "loss")} for r in res]
                          for res in together], fused_calls=len(fused_calls))
        torch.save(outputs, out_path)
        return
    for params, dtype in RUNS[runs]:
        fused_calls.clear()
        result = gptq.solve_gptq(layer.weight.to(dtype), layer.hessian_sum, layer.n_tokens, GPTQConfig(**params))
        outputs[(_id(params), str(dtype))] = dict(codes=result.codes, scales=result.scales, zeros=result.zeros,
                                                  g_idx=result.g_idx, loss=result.loss, fused_calls=len(fused_calls))
    torch.save(outputs, out_path)


@pytest.fixture(scope="module")
def interpreted(tmp_path_factory, request) -> dict:
    """(case id, dtype) -> outputs of the runs of RUNS this module's selected tests read, from one interpreter
    process per run, all at once."""
    pytest.importorskip("triton")
    wanted = {(_id(item.callspec.params["params"]), str(torch.float32 if "float32" in item.name else torch.float64))
              for item in request.session.items if item.module is request.module and hasattr(item, "callspec")}
    runs = [run for run, cases in RUNS.items() if any((_id(p), str(dtype)) in wanted for p, dtype in cases)]
    return run_interpreted("tests.solver.test_gptq_fused_interpreted", runs, tmp_path_factory.mktemp("interpreted"),
                           timeout_s=600)


def _batched_groups() -> list:
    """Two groups sharing the layer's Hessian and three down-projection-like groups of 48 rows with
    Hessians of their own (float64)."""
    from rayquant.solver.gptq import GroupProblem

    layer = _layer()
    g = torch.Generator().manual_seed(5)
    W = layer.weight.double()
    groups = [GroupProblem([W[:48], W[48:64]], layer.hessian_sum, layer.n_tokens),
              GroupProblem([W[64:]], layer.hessian_sum, layer.n_tokens)]
    for e in range(3):
        x = torch.randn(300, W.shape[1], generator=g, dtype=torch.float64) * torch.rand(W.shape[1], generator=g,
                                                                                    dtype=torch.float64)
        groups.append(GroupProblem([torch.randn(48, W.shape[1], generator=g, dtype=torch.float64)], x.T @ x, 300))
    return groups


@pytest.fixture(scope="module")
def batched_runs(tmp_path_factory, request) -> dict:
    pytest.importorskip("triton")
    wide = any("group_size=-1" in item.name and "batched" in item.name for item in request.session.items)
    return run_interpreted("tests.solver.test_gptq_fused_interpreted", ["batched"] + ["batched_wide"] * wide,
                           tmp_path_factory.mktemp("batched"), timeout_s=600)


def _decoded_loss(out: dict) -> float:
    """tr((W - Q) H (W - Q)ᵀ) in float64 of the weight the codes, scales and zeros decode to."""
    layer = _layer()
    E = layer.weight.double() - dequantize(out["codes"], out["scales"], out["zeros"], out["g_idx"]).double()
    return float(((E @ (layer.hessian_sum.double() / layer.n_tokens)) * E).sum())


def _assert_same_as_textbook_in_float64(out: dict, cfg: GPTQConfig) -> None:
    textbook = _textbook(cfg)
    assert out["fused_calls"] == 1  # the fused path ran, not the torch loop
    same_codes = (out["codes"].long() == textbook.codes).double().mean().item()
    assert same_codes >= 0.999, f"only {same_codes:.4%} of codes equal the textbook's"
    assert torch.equal(out["g_idx"].long(), textbook.g_idx)
    same_scales = (out["scales"].double() == textbook.scales).double().mean().item()
    assert same_scales >= 0.999, f"only {same_scales:.4%} of scales equal the textbook's"
    same_zeros = (out["zeros"].double() == textbook.zeros).double().mean().item()
    assert same_zeros >= 0.999, f"only {same_zeros:.4%} of zeros equal the textbook's"
    assert out["loss"] == pytest.approx(textbook.loss, rel=1e-6)
    assert out["loss"] == pytest.approx(_decoded_loss(out), rel=1e-6)


@pytest.mark.parametrize("params", CASES, ids=_id)
def test_interpreted_fused_float64_codes_scales_and_loss_equal_textbook_gptq(interpreted: dict, params: dict) -> None:
    _assert_same_as_textbook_in_float64(interpreted[(_id(params), str(torch.float64))], GPTQConfig(**params))


@pytest.mark.parametrize("params", [*FLOAT32_CASES, *(pytest.param(p, marks=pytest.mark.full_matrix)
                                                     for p in FLOAT32_REST)], ids=_id)
def test_interpreted_fused_float32_loss_within_0p1_percent_of_textbook_and_decodes_to_it(
        interpreted: dict, params: dict) -> None:
    cfg = GPTQConfig(**params)
    layer = _layer()
    out = interpreted[(_id(params), str(torch.float32))]
    textbook_loss = _textbook(cfg).loss
    assert out["fused_calls"] == 1
    assert abs(out["loss"] - textbook_loss) <= 1e-3 * textbook_loss, (out["loss"], textbook_loss)
    # the loss reported from the kernel's sums ‖E‖² - λ‖W - Q‖² is the loss of what the checkpoint stores
    assert out["loss"] == pytest.approx(_decoded_loss(out), rel=1e-5)
    assert out["loss"] < quantize_rtn(layer.weight, layer.hessian_sum, layer.n_tokens, cfg).loss


@pytest.mark.slow
@pytest.mark.parametrize("params", COLUMN_BATCH_CASES, ids=_id)
def test_interpreted_fused_float64_equals_textbook_whatever_the_column_batch(interpreted: dict, params: dict) -> None:
    _assert_same_as_textbook_in_float64(interpreted[(_id(params), str(torch.float64))],
                                        GPTQConfig(**params))


@pytest.mark.parametrize("params", [BATCHED_CASES[0], pytest.param(BATCHED_CASES[1], marks=pytest.mark.full_matrix)],
                         ids=_id)
def test_interpreted_fused_batched_solves_equal_each_group_alone(params: dict, batched_runs: dict) -> None:
    """One column loop over a shared Hessian's stacked groups and one over three Hessians batched (the
    kernel's problem dimension) give every group the codes and loss the torch loop gives it alone (float64)."""
    out = batched_runs[(_id(params), "batched")]
    assert out["fused_calls"] == 2  # one per batch: the shared Hessian's, the three distinct ones'
    alone = [solve_input_group(g.weights, g.hessian_sum, g.n_tokens, GPTQConfig(**params)) for g in _batched_groups()]
    for together, alone in zip(out["together"], alone, strict=True):
        for a, b in zip(together, alone, strict=True):
            assert torch.equal(a["g_idx"], b.g_idx)
            assert (a["codes"] == b.codes).double().mean().item() >= 0.999
            assert (a["scales"] == b.scales).double().mean().item() >= 0.999
            assert a["loss"] == pytest.approx(b.loss, rel=1e-6)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

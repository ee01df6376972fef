"""quantize_rtn: plain rounding on the same grids as GPTQ, loss against the same H."""

import pytest
import torch

from rayquant.solver import rtn
from rayquant.solver.gptq import GPTQConfig, dequantize
from rayquant.solver.hessian import InvalidSolverInput, NonFiniteSolverInput
from rayquant.solver.rtn import quantize_rtn, quantize_rtn_many
from tests.solver.calibration_cases import layer_case


def _weight_in_range(low: float, high: float, seed: int) -> torch.Tensor:
    """[4, 32] weights uniform in [low, high] with both ends present in every row."""
    gen = torch.Generator().manual_seed(seed)
    weight = low + (high - low) * torch.rand(4, 32, generator=gen)
    weight[:, 0], weight[:, 1] = low, high
    return weight


def test_asym_rtn_is_torch_round_on_the_min_max_grid() -> None:
    weight = _weight_in_range(-1.5, 6.0, seed=0)  # scale (6 + 1.5) / 15 = 0.5, zero round(1.5 / 0.5) = 3
    result = quantize_rtn(weight, torch.eye(32), 1, GPTQConfig(bits=4, group_size=-1, sym=False))
    assert torch.equal(result.scales, torch.full((1, 4), 0.5))
    assert torch.equal(result.zeros, torch.full((1, 4), 3, dtype=torch.int32))
    assert torch.equal(result.codes.long(), (torch.round(weight / 0.5) + 3).long())
    Q = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
    assert result.loss == pytest.approx(float(((weight - Q) ** 2).sum()), rel=1e-6)  # H = I


def test_sym_rtn_is_torch_round_around_the_middle_level_and_clips_the_top() -> None:
    weight = _weight_in_range(-3.75, 3.75, seed=1)  # scale 2 · 3.75 / 15 = 0.5, zero 8
    result = quantize_rtn(weight, torch.eye(32), 1, GPTQConfig(bits=4, group_size=-1, sym=True))
    assert torch.equal(result.scales, torch.full((1, 4), 0.5))
    assert torch.equal(result.zeros, torch.full((1, 4), 8, dtype=torch.int32))
    expected = torch.clamp(torch.round(weight / 0.5) + 8, 0, 15)
    assert torch.equal(result.codes.long(), expected.long())
    assert int(result.codes[:, 1].max()) == 15  # 3.75 / 0.5 + 8 = 15.5 rounds to 16: clipped


def test_rtn_loss_uses_the_hessian() -> None:
    weight = _weight_in_range(-1.0, 1.0, seed=2)
    H = torch.diag(torch.linspace(1.0, 4.0, 32))
    result = quantize_rtn(weight, 8 * H, 8, GPTQConfig(bits=3, group_size=8))
    E = weight.double() - dequantize(result.codes, result.scales, result.zeros, result.g_idx).double()
    assert result.loss == pytest.approx(float(torch.trace(E @ H.double() @ E.T)), rel=1e-6)
    assert result.damp_percent == 0.0


def test_rtn_groups_follow_act_order_like_gptq() -> None:
    case = layer_case(out_features=16, seed=3)
    cfg = GPTQConfig(bits=4, group_size=64, desc_act=True)
    result = quantize_rtn(case.weight, case.hessian_sum, case.n_tokens, cfg)
    perm = torch.argsort(torch.diag(case.hessian_sum), descending=True, stable=True)
    assert torch.equal(result.g_idx[perm].long(), torch.arange(256) // 64)
    first_group = case.weight[:, perm[:64]]
    assert torch.equal(result.scales[0], (2 * first_group.abs().amax(1) / 15).half().float())


# --- many layers at once (a MoE block's experts): quantize_rtn_many against quantize_rtn one layer at a time

def _moe_like_layers(dtype: torch.dtype, seed: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """14 layers of 3 shapes: 4 experts' gate/up pairs sharing their Hessian object, one Hessian shared by
    all of a second shape, 3 layers of a third shape with their own; dead input columns in every Hessian."""
    gen = torch.Generator().manual_seed(seed)

    def hessian(K: int, n: int) -> torch.Tensor:
        x = torch.randn(n, K, generator=gen)
        x[:, torch.randperm(K, generator=gen)[:3]] = 0.0  # inputs no token reached
        return x.T @ x

    def weight(N: int, K: int) -> torch.Tensor:
        return (torch.randn(N, K, generator=gen) * 0.02 + torch.randn(N, 1, generator=gen) * 0.01).to(dtype)

    weights, hessians, n_tokens = [], [], []
    for _ in range(4):  # gate_e, up_e share H_e
        H = hessian(96, 50)
        for _ in range(2):
            weights.append(weight(64, 96)), hessians.append(H), n_tokens.append(50)
    H = hessian(64, 70)
    for _ in range(3):  # down experts with one all-token Hessian
        weights.append(weight(96, 64)), hessians.append(H), n_tokens.append(70)
    for n in (30, 31, 32):  # their own Hessians
        weights.append(weight(32, 128)), hessians.append(hessian(128, n)), n_tokens.append(n)
    order = torch.randperm(len(weights), generator=gen).tolist()  # shapes and Hessians interleaved
    return [weights[i] for i in order], [hessians[i] for i in order], [n_tokens[i] for i in order]


def _assert_equal_to_one_by_one(results, weights, hessians, n_tokens, cfg, loss_rel: float) -> None:
    _assert_same_results(results, [quantize_rtn(w, H, n, cfg) for w, H, n in zip(weights, hessians, n_tokens)],
                         loss_rel)


def _assert_same_results(results, alone, loss_rel: float) -> None:
    for result, one in zip(results, alone, strict=True):
        for field in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(result, field), getattr(one, field)), field
        assert result.loss == pytest.approx(one.loss, rel=loss_rel, abs=0.0) and result.loss > 0


@pytest.mark.parametrize("bits,group_size,desc_act,sym,static_groups", [
    (2, 32, False, False, False), (3, -1, True, True, False), (4, 32, True, False, False),
    (4, 32, True, True, True), (8, -1, False, True, False), (8, 32, True, False, True)])
@pytest.mark.parametrize("dtype,loss_rel", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
def test_many_layers_get_bitwise_the_codes_of_one_by_one(bits: int, group_size: int, desc_act: bool, sym: bool,
                                                         static_groups: bool, dtype: torch.dtype, loss_rel: float,
                                                         monkeypatch) -> None:
    weights, hessians, n_tokens = _moe_like_layers(dtype, seed=bits)
    cfg = GPTQConfig(bits=bits, group_size=group_size, desc_act=desc_act, sym=sym, static_groups=static_groups)
    alone = [quantize_rtn(w, H, n, cfg) for w, H, n in zip(weights, hessians, n_tokens)]
    _assert_same_results(quantize_rtn_many(weights, hessians, n_tokens, cfg), alone, loss_rel)
    # 3 layers of a shape per chunk: a shared Hessian's run is cut, single Hessians are stacked
    per_layer = (rtn._TEMPORARIES * 64 * 96 + 96 * 96) * dtype.itemsize
    monkeypatch.setitem(rtn.RTN_CHUNK_BYTES, "cpu", 3 * per_layer)
    _assert_same_results(quantize_rtn_many(weights, hessians, n_tokens, cfg), alone, loss_rel)


def test_a_shared_hessian_is_converted_once_and_never_copied_per_layer() -> None:
    """One input group's layers: the [K, K] tensors made from its fp32 Hessian (its NaN scan's, and one fp64
    conversion for fp64 weights) are the same for 20 layers as for 2, and fp32 weights convert nothing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class KKOutputs(TorchDispatchMode):  # records every op whose output is [..., K, K]
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if isinstance(out, torch.Tensor) and out.shape[-2:] == (64, 64):
                self.ops.append(str(func))
            return out

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(200, 64, generator=gen)
    H = x.T @ x
    cfg = GPTQConfig(bits=4, group_size=32, desc_act=True)
    for dtype, conversions in ((torch.float32, 0), (torch.float64, 1)):
        ops = []
        for n_layers in (2, 20):
            weights = [torch.randn(24, 64, generator=gen, dtype=dtype) * 0.02 for _ in range(n_layers)]
            with KKOutputs() as mode:
                results = quantize_rtn_many(weights, [H] * n_layers, [200] * n_layers, cfg)
            ops.append(mode.ops)
            _assert_equal_to_one_by_one(results, weights, [H] * n_layers, [200] * n_layers, cfg, loss_rel=1e-6)
        assert ops[0] == ops[1]
        assert ops[1].count("aten._to_copy.default") == conversions


def test_many_layers_refuse_a_nan_weight_and_a_misfit_hessian_like_one_layer() -> None:
    weights, hessians, n_tokens = _moe_like_layers(torch.float32, seed=9)
    finite = weights[5]
    weights[5] = finite.clone()
    weights[5][3, 7] = float("nan")
    with pytest.raises(NonFiniteSolverInput, match=r"weight \(\d+, \d+\) has 1 NaN/Inf"):
        quantize_rtn_many(weights, hessians, n_tokens, GPTQConfig())
    weights[5] = finite
    hessians[5] = hessians[5].clone()
    hessians[5][2, 2] = float("inf")
    with pytest.raises(NonFiniteSolverInput, match=r"hessian_sum \(\d+, \d+\) has 1 NaN/Inf"):
        quantize_rtn_many(weights, hessians, n_tokens, GPTQConfig())
    weights[5] = torch.zeros(8, 17)
    with pytest.raises(InvalidSolverInput, match=r"weight \(8, 17\) and hessian_sum"):
        quantize_rtn_many(weights, hessians, n_tokens, GPTQConfig())
    with pytest.raises(InvalidSolverInput, match="one Hessian sum and one token count per weight"):
        quantize_rtn_many(weights, hessians[:-1], n_tokens, GPTQConfig())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_many_layers_on_cuda_equal_one_by_one_and_the_float64_loss() -> None:
    weights, hessians, n_tokens = _moe_like_layers(torch.float32, seed=13)
    cfg = GPTQConfig(bits=4, group_size=32, desc_act=True, sym=False)
    on_cuda = {id(H): H.cuda() for H in hessians}  # shared Hessians stay one object on the GPU
    results = quantize_rtn_many([w.cuda() for w in weights], [on_cuda[id(H)] for H in hessians], n_tokens, cfg)
    # the loss's bf16 tensor-core product (layer_loss(parts=1)): a baseline at ~1e-5, not bitwise
    _assert_equal_to_one_by_one(results, [w.cuda() for w in weights], [on_cuda[id(H)] for H in hessians],
                                n_tokens, cfg, loss_rel=1e-4)
    # CUDA divides by a Python scalar as a multiply by its reciprocal: a few scales, and so codes, differ
    # from the CPU's; the loss stays the same layer's loss
    exact = quantize_rtn_many([w.double() for w in weights], hessians, n_tokens, cfg)
    for result, ref in zip(results, exact, strict=True):
        assert result.loss == pytest.approx(ref.loss, rel=2e-3)

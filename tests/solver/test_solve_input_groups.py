"""Many input groups in one call (solver/gptq.py `solve_input_groups`, MoE experts): groups sharing one
Hessian tensor are one stacked solve, groups with Hessians of their own are batched; on CPU each group's
result is bitwise the one it gets solved alone, in every chunking."""

import pytest
import torch

from rayquant.solver import gptq
from rayquant.solver.gptq import GPTQConfig, GroupProblem, HessianNotPositiveDefinite, solve_input_group, solve_input_groups

CONFIGS = [GPTQConfig(act_group_aware=True),
           GPTQConfig(desc_act=True, sym=False, group_size=32),
           GPTQConfig(static_groups=True, desc_act=True, group_size=32, bits=3),
           GPTQConfig(group_size=-1, column_batch=40)]


def _hessian(g: torch.Generator, K: int, n: int, dtype: torch.dtype, dead: int | None = None) -> torch.Tensor:
    x = torch.randn(n, K, generator=g, dtype=dtype) * torch.rand(K, generator=g, dtype=dtype)
    if dead is not None:
        x[:, dead] = 0
    return x.T @ x


def _moe_stage(seed: int, dtype: torch.dtype) -> list[GroupProblem]:
    """Six experts' gate/up sharing one Hessian, six down projections with their own (one with a dead
    input), and a group of another width: every kind of batch in one call."""
    g = torch.Generator().manual_seed(seed)
    shared = _hessian(g, 96, 300, dtype)
    groups = [GroupProblem([torch.randn(40, 96, generator=g, dtype=dtype), torch.randn(40, 96, generator=g, dtype=dtype)],
                           shared, 300) for _ in range(6)]
    groups += [GroupProblem([torch.randn(96, 40, generator=g, dtype=dtype)],
                            _hessian(g, 40, 50 + 10 * e, dtype, dead=3 if e == 2 else None), 50 + 10 * e)
               for e in range(6)]
    groups.append(GroupProblem([torch.randn(24, 64, generator=g, dtype=dtype)], _hessian(g, 64, 200, dtype), 200))
    return groups


def _assert_same(a, b) -> None:
    for x, y in zip(a, b, strict=True):
        for f in ("codes", "scales", "zeros", "g_idx"):
            assert torch.equal(getattr(x, f), getattr(y, f)), f
        assert x.loss == y.loss and x.damp_percent == y.damp_percent


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"b{c.bits}g{c.group_size}{'d' if c.desc_act else ''}"
                         f"{'s' if c.static_groups else ''}{'gar' if c.act_group_aware else ''}")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_each_group_as_alone(cfg, dtype):
    groups = _moe_stage(0, dtype)
    together = solve_input_groups(groups, cfg)
    for g, res in zip(groups, together, strict=True):
        _assert_same(res, solve_input_group(g.weights, g.hessian_sum, g.n_tokens, cfg))


def test_chunked_as_whole(monkeypatch):
    """A budget of a few groups cuts the shared Hessian's rows and the batch of down projections into
    chunks: the results do not change."""
    cfg = GPTQConfig(act_group_aware=True)
    groups = _moe_stage(1, torch.float32)
    whole = solve_input_groups(groups, cfg)
    monkeypatch.setattr(gptq, "SOLVE_CHUNK_BYTES", 2 * 3 * 4 * 80 * 96)  # two gate/up groups; down: 1 per batch
    for a, b in zip(whole, solve_input_groups(groups, cfg), strict=True):
        _assert_same(a, b)


def test_failing_hessian_is_named():
    """An indefinite Hessian among batched ones: the error says which group, after every damping."""
    g = torch.Generator().manual_seed(2)
    groups = [GroupProblem([torch.randn(8, 16, generator=g)], _hessian(g, 16, 40, torch.float32), 40) for _ in range(4)]
    bad = -torch.eye(16)
    groups[2] = GroupProblem(groups[2].weights, bad, 40)
    with pytest.raises(HessianNotPositiveDefinite) as info:
        solve_input_groups(groups, GPTQConfig(damp_cap=0.05))
    assert info.value.group == 2 and info.value.damp_tried[-1] == 0.05

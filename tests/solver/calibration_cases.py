"""Layers with realistic calibration statistics for solver tests, seeded."""

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from rayquant.solver.gptq import GPTQConfig
from tests.solver.textbook_gptq import TextbookResult, textbook_gptq


@dataclass(frozen=True)
class LayerCase:
    weight: Tensor       # [N, K] float32
    hessian_sum: Tensor  # [K, K] float32, Σ xᵀx
    n_tokens: int


def correlated_activations(n_tokens: int, in_features: int, seed: int) -> Tensor:
    """x = z @ A: correlated channels of spread scales, a few 4x larger (outlier channels, as in LLMs).

    Much stronger outliers (10x on 1/16 of the channels) make GPTQ without act-order lose to RTN at
    2 bits with small groups: the error feedback inflates later groups' ranges (why act-order exists).
    """
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n_tokens, in_features, generator=gen, dtype=torch.float64)
    A = torch.eye(in_features, dtype=torch.float64) + 0.5 * torch.randn(
        in_features, in_features, generator=gen, dtype=torch.float64) / in_features**0.5
    channel_scale = torch.exp(torch.randn(in_features, generator=gen, dtype=torch.float64) * 0.3)
    channel_scale[torch.randperm(in_features, generator=gen)[: in_features // 32]] *= 4.0
    return ((z @ A) * channel_scale).float()


def layer_case(out_features: int = 96, in_features: int = 256, n_tokens: int = 1024, seed: int = 0) -> LayerCase:
    gen = torch.Generator().manual_seed(seed + 1000)
    x = correlated_activations(n_tokens, in_features, seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    weight += torch.randn(out_features, 1, generator=gen) * 0.01  # row offsets: asym grids differ from sym
    return LayerCase(weight=weight, hessian_sum=x.T @ x, n_tokens=n_tokens)


@functools.cache
def textbook_layer(out_features: int) -> LayerCase:
    """The layer the solvers are compared with the textbook on (256 in_features, 1024 tokens, seed 0),
    built once per process."""
    return layer_case(out_features=out_features, in_features=256, n_tokens=1024, seed=0)


@functools.cache
def textbook_result(cfg: GPTQConfig, out_features: int) -> TextbookResult:
    """textbook_gptq on textbook_layer(out_features), solved once per config and process."""
    layer = textbook_layer(out_features)
    return textbook_gptq(layer.weight, layer.hessian_sum, layer.n_tokens, cfg)

"""Perplexity as every rayquant path computes it: in the job's pass, in `rayquant eval`, in benches.

One definition so the numbers agree: position t predicts token t + 1 of the same window (no token
predicts across windows), log-softmax in float32, negative log-likelihoods summed in float64.
Perplexity = exp(total NLL / total predicted tokens), with totals summed over windows and workers.
"""

from __future__ import annotations

import math

import torch


def window_nll(logits: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token NLL of [B, T] ids under [B, T, V] logits, and the count of predicted tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    target = ids[:, 1:].to(logp.device)
    nll = -logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return float(nll.double().sum()), target.numel()


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(mean NLL); NaN when nothing was evaluated."""
    return math.exp(nll_sum / n_tokens) if n_tokens else float("nan")

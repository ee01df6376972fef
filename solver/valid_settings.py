"""What a GPTQ solve and the GPTQ v1 format accept: one home for each rule on the settings a job sets.

GPTQConfig (solver/gptq.py) enforces these; the job spec (jobs/spec.py) reports the same problems
under its own field names before anything runs. Each function returns None, or what to change. No
torch here: the CLI validates a spec without importing it.
"""

from __future__ import annotations

SUPPORTED_BITS = (2, 3, 4, 8)  # the widths GPTQ v1 packs into int32 words (3 bits: 32 values in 3 words)


def bits_problem(bits: int) -> str | None:
    return None if bits in SUPPORTED_BITS else f"bits={bits} is not supported; use 2, 3, 4 or 8"


def group_size_problem(group_size: int) -> str | None:
    if group_size == -1 or group_size >= 1:
        return None
    return f"group_size={group_size}; use -1 (one group per row) or a positive size such as 128"


def damp_problem(damp_percent: float) -> str | None:
    # 0 would trust an exactly singular H; 1 or more damps H by its own mean diagonal and solves little
    return None if 0 < damp_percent < 1 else f"damp_percent={damp_percent}; use a value in (0, 1), e.g. 0.01"


def damp_increment_problem(damp_auto_increment: float) -> str | None:
    if 0 <= damp_auto_increment < 1:
        return None
    return f"damp_auto_increment={damp_auto_increment}; use a value in [0, 1), e.g. 0.01 (0 = never retry)"


def solve_order_problem(desc_act: bool, act_group_aware: bool) -> str | None:
    if desc_act and act_group_aware:
        return "act_group_aware and desc_act are two solve orders; choose one"
    return None


class HessianNotPositiveDefinite(Exception):
    """The damped Hessian stayed non positive definite up to the damping cap."""

    def __init__(self, message: str, n_tokens: int | None = None, damp_tried: tuple[float, ...] = ()) -> None:
        super().__init__(message)
        self.n_tokens = n_tokens
        self.damp_tried = damp_tried

"""The job's records that outlive a worker: what each quantized linear reports (block markers, report.json).

Torch-free: the driver, the checkpoint and the model card read them without the solver.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LayerReport:
    name: str  # full tensor prefix, e.g. model.layers.3.mlp.down_proj
    input_group: str
    in_features: int
    out_features: int
    gptq_loss: float
    rtn_loss: float
    damp_percent: float
    n_tokens: int
    owner: int  # the rank that solved every row; -1: rows split over all ranks (workers/row_split.py)
    max_rel_err: float
    mean_rel_err: float
    routed_tokens: int | None = None  # MoE experts: calibration tokens the router sent it (all ranks)
    starved_policy: str | None = None  # MoE experts below quant.moe.min_tokens: the policy applied to it

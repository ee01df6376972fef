"""GPTQModel's own GPTQ quantization on CPU: the other tool's checkpoint for `rayquant eval` and the bench.

GPTQModel 7.7.0 (installed by .ci/install-test-deps.sh with --no-deps) quantizes on torch 2.13 CPU
with only its load-path requirements: given pre-tokenized windows it never imports `datasets`.
Settings follow the rayquant spec where GPTQModel has one (damp_percent 0.01 instead of its 0.05,
true_sequential, no act-order). GPTQModel's default `act_group_aware` (group-aware reordering, Gafni
et al. 2025: with desc_act off it still solves the columns in diag(H) order inside each group and the
groups by importance, so groups and g_idx stay plain) is not in the GPTQ paper; act_group_aware=False
gives the paper's column order, as rayquant's desc_act=false does.
"""

from __future__ import annotations

import os
import contextlib
import time
from pathlib import Path

from torch import Tensor

from .gptq_loader import CPU_WORKERS_ENV


def quantize_with_gptqmodel(source_dir: Path, samples: Tensor, out: Path, bits: int = 4, group_size: int = 128,
                            damp_percent: float = 0.01, act_group_aware: bool = True) -> float:
    """Quantize source_dir on [n, seq_len] int64 calibration windows and save a GPTQ v1 checkpoint to `out`.

    Returns the wall seconds of load + quantize + save.
    """
    for name, value in CPU_WORKERS_ENV.items():
        os.environ.setdefault(name, value)
    from gptqmodel import GPTQModel, QuantizeConfig

    start = time.perf_counter()
    config = QuantizeConfig(bits=bits, group_size=group_size, desc_act=False, sym=True, true_sequential=True,
                            damp_percent=damp_percent, act_group_aware=act_group_aware, offload_to_disk=False)
    source_dir, out = Path(source_dir).resolve(), Path(out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.chdir(out.parent):  # GPTQModel writes a logs/ folder into the working directory
        model = GPTQModel.load(str(source_dir), config, device="cpu")
        windows = [{"input_ids": row.tolist(), "attention_mask": [1] * len(row)} for row in samples]
        model.quantize(windows, batch_size=4)
        model.save(str(out))
    return time.perf_counter() - start

from pathlib import Path

import pytest

from ..bench.real_models import gemma3_270m_dir
from .models import SPEC, run_cli

# small enough for the suite (~3 min on 2 cores), large enough that GPTQ's lead over RTN is wide
GEMMA3_SETTINGS = {"quant.bits": 4, "quant.group_size": 128, "calibration.n_samples": 16,
                   "calibration.seq_len": 256, "calibration.eval_samples": 4, "calibration.eval_rtn": "true"}


@pytest.fixture(scope="session")
def gemma3_270m_w4(synthetic_cache, tmp_path_factory) -> tuple[Path, Path]:
    """Gemma-3-270M's real weights and their 4-bit g128 rayquant output, shared by the quality and vLLM tests."""
    source = gemma3_270m_dir(synthetic_cache)
    out = tmp_path_factory.mktemp("gemma3-270m") / "w4g128"
    settings = {**GEMMA3_SETTINGS, "model.source": source, "output.uri": out}
    proc = run_cli("quantize", str(SPEC), *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return source, out

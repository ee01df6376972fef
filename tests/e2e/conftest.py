import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from .models import REPO, SPEC, run_cli
from .quantize_jobs import QuantizeJobs, QuantizeRun

# small enough for the suite (~3 min on 2 cores), large enough that GPTQ's lead over RTN is wide
GEMMA3_SETTINGS = {"quant.bits": 4, "quant.group_size": 128, "calibration.n_samples": 16,
                   "calibration.seq_len": 256, "calibration.eval_samples": 4, "calibration.eval_rtn": "true"}


def _quantize_gemma3(cache: Path, out: Path) -> tuple[Path, QuantizeRun]:
    """Gemma-3-270M converted into the cache by a process of its own (~1 min of GGUF parsing on one core,
    which in this process would hold the GIL the tests need), then quantized into `out`."""
    convert = subprocess.run([sys.executable, "-m", "tests.bench.real_models", str(cache)], capture_output=True,
                             text=True, timeout=1200, cwd=REPO)
    assert convert.returncode == 0, convert.stderr[-3000:]
    source = Path(convert.stdout.strip().splitlines()[-1])
    settings = {**GEMMA3_SETTINGS, "model.source": source, "output.uri": out}
    proc = run_cli("quantize", str(SPEC), *(a for k, v in settings.items() for a in ("--set", f"{k}={v}")), timeout=1200)
    return source, QuantizeRun(proc, out)


@pytest.fixture(scope="session", autouse=True)
def gemma3_in_background(synthetic_cache, tmp_path_factory, request) -> Iterator[Future | None]:
    """With the first end-to-end test, start what `gemma3_270m_w4` returns if a selected test needs it:
    conversion and job (~2.5 min, the conversion on one core) run beside the tests before test_gemma3."""
    if not any("gemma3_270m_w4" in item.fixturenames for item in request.session.items):
        yield None
        return
    with ThreadPoolExecutor(1, thread_name_prefix="gemma3") as pool:
        yield pool.submit(_quantize_gemma3, synthetic_cache, tmp_path_factory.mktemp("gemma3-270m") / "w4g128")


@pytest.fixture(scope="session")
def gemma3_270m_w4(gemma3_in_background) -> tuple[Path, Path]:
    """Gemma-3-270M's real weights and their 4-bit g128 rayquant output, shared by the quality and vLLM tests."""
    source, run = gemma3_in_background.result()
    return source, run.output()


@pytest.fixture(scope="session")
def quantize_once(tmp_path_factory) -> Iterator[QuantizeJobs]:
    """Each distinct job once in the session, shared by the tests that read it (see quantize_jobs.py)."""
    jobs = QuantizeJobs(tmp_path_factory)
    yield jobs
    jobs.close()

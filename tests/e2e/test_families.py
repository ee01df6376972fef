"""Other dense decoder families through the same generic adapter, read back by the independent loader."""

from __future__ import annotations

import json

import pytest

from rayquant.solver.gptq import GPTQConfig
from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import open_model_source

from .models import fp_model, logit_mse, logits, rtn_model
from .quantize_jobs import selected_params

pytestmark = pytest.mark.slow


# quantized linears per block: separate q/k/v/o + gate/up/down; Phi-3 fuses qkv and gate_up; OPT has fc1/fc2
LINEARS_PER_BLOCK = {"mistral-tiny": 7, "qwen2-tiny": 7, "qwen3-tiny": 7, "gemma2-tiny": 7, "gemma3-tiny": 7,
                     "phi3-tiny": 4, "opt-tiny": 6}


@pytest.fixture(scope="module", autouse=True)
def jobs_in_background(quantize_once, request):
    for family in selected_params(request, "family"):
        quantize_once.start(f"model.source=synthetic://{family}")
    yield
    quantize_once.finish()


@pytest.mark.parametrize("family", list(LINEARS_PER_BLOCK))
def test_family_quantizes_and_beats_rtn_through_transformers_gptq_path(family, quantize_once):
    from .gptq_loader import load_gptq_logits

    out = quantize_once(f"model.source=synthetic://{family}").output()  # phi3-tiny's also goes to vLLM
    source = open_model_source(f"synthetic://{family}").path
    layers = json.loads((out / "report.json").read_text())["layers"]
    assert len(layers) == 4 * LINEARS_PER_BLOCK[family] and all(x["gptq_loss"] < x["rtn_loss"] for x in layers)
    ids = load_calibration("builtin://text", source, 32, 256, 8, 0).eval_samples
    fp = logits(fp_model(source), ids)
    rtn = logits(rtn_model(source, GPTQConfig(bits=4, group_size=128, sym=True)), ids)
    loaded = load_gptq_logits(out, ids, bits=4)
    assert logit_mse(loaded, fp) <= logit_mse(rtn, fp)

"""Real weights: Gemma-3-270M (gemma3_text: sliding-window layers, tied embeddings, a 262k
vocabulary) quantizes end to end, and GPTQ beats RTN on held-out perplexity."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_gemma3_270m_quantizes_and_gptq_beats_rtn_on_held_out_perplexity(gemma3_270m_w4):
    source, out = gemma3_270m_w4
    config = json.loads((source / "config.json").read_text())
    assert config["model_type"] == "gemma3_text" and config["tie_word_embeddings"]
    report = json.loads((out / "report.json").read_text())
    # 7 linears per block (q, k, v, o, gate, up, down), every one solved better than its RTN baseline
    layers = report["layers"]
    assert len(layers) == config["num_hidden_layers"] * 7
    assert all(x["gptq_loss"] < x["rtn_loss"] for x in layers)
    ev = report["eval"]
    assert ev["fp_ppl"] < ev["gptq_ppl"] < ev["rtn_ppl"], ev
    # tied embeddings: the head is the embedding, copied unquantized, never written twice
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert "model.embed_tokens.weight" in index and "lm_head.weight" not in index

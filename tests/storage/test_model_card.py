"""The model card reads the job's report: settings, the eval table when measured, one row per layer."""

from __future__ import annotations

from dataclasses import replace

from rayquant.storage.model_card import render_model_card

from .test_job_records import DENSE, EXPERT, REPORT

SPEC = {"name": "tiny-w4g128", "model": {"source": "synthetic://llama-tiny"}}


def test_card_names_the_settings_the_metrics_and_every_layer():
    card = render_model_card(REPORT, SPEC)
    assert card.startswith("---\nlibrary_name: transformers\n") and "# tiny-w4g128\n" in card
    assert ("GPTQ 4-bit checkpoint (format `gptq`) of `synthetic://llama-tiny` (revision `666666666666`), "
            "written by rayquant:0.1.0.") in card
    assert ("Quantization: bits=4, group_size=128, desc_act=False, sym=True, static_groups=False, "
            "true_sequential=True, damp_percent=0.01.") in card
    assert "| ppl_delta | 0.8 |" in card and "| rtn_ppl | 1050 |" in card
    assert f"| {EXPERT.name} | 0.25 | 1 | 0.2500 | 0.02 | 4096 | 3e-07 |" in card
    assert f"| {DENSE.name} | 7.5e-05 | 1 | 0.0001 | 0.01 | 8192 | 0 |" in card


def test_card_without_eval_has_no_evaluation_section():
    card = render_model_card(replace(REPORT, eval=None), SPEC)
    assert "## Evaluation" not in card and "## Layer errors" in card

"""The model card: front matter the Hub reads, source and calibration, evaluation, a per-layer summary with the
picture, and how to load the output; a pure function of the report and the resolved spec."""

from __future__ import annotations

import re
from dataclasses import replace

import pytest
import yaml

from rayquant.storage.job_records import LayerReport
from rayquant.storage.loss_plot import render_loss_ratio_png
from rayquant.storage.model_card import (WORST_LAYERS, LoadTarget, base_model_of, load_target, render_model_card,
                                         vllm_problems)

from .test_job_records import DENSE, EXPERT, QUANT, REPORT

SPEC = {"name": "tiny", "model": {"source": "synthetic://llama-tiny"},
        "calibration": {"n_samples": 2, "seq_len": 256, "seed": 7}}
HUB_SPEC = {**SPEC, "model": {"source": "hf://meta-llama/Llama-3.1-8B@main"}}


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    head, sep, _ = card[4:].partition("\n---\n")
    assert sep, "the front matter is not closed"
    return yaml.safe_load(head)


def layer(block: int, kind: str, gptq_loss: float, rtn_loss: float = 1.0) -> LayerReport:
    return replace(DENSE, name=f"model.layers.{block}.{kind}", gptq_loss=gptq_loss, rtn_loss=rtn_loss)


def test_front_matter_is_yaml_with_the_hub_keys_and_every_quantization_setting():
    meta = front_matter(render_model_card(REPORT, HUB_SPEC))
    assert meta["base_model"] == "meta-llama/Llama-3.1-8B" and meta["base_model_relation"] == "quantized"
    assert meta["library_name"] == "transformers" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["gptq", "4-bit", "rayquant"]
    assert meta["quantization_config"] == {
        "quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False, "act_group_aware": True,
        "damp_percent": 0.01, "true_sequential": True, "static_groups": False, "checkpoint_format": "gptq",
        "dynamic": {"+:.*down_proj": {"bits": 8}, "-:.*o_proj": {}},
    }
    plain = front_matter(render_model_card(replace(REPORT, quantization=replace(QUANT, bits=8, dynamic=None)), SPEC))
    assert "4-bit" not in plain["tags"] and "8-bit" in plain["tags"] and "dynamic" not in plain["quantization_config"]


@pytest.mark.parametrize("source, base_model", [
    ("hf://org/name@0123abc", "org/name"), ("hf://org/name", "org/name"), ("hf://gpt2@main", "gpt2"),
    ("synthetic://llama-tiny", None), ("/models/tiny", None), ("s3://bucket/models/tiny", None),
])
def test_only_hub_sources_name_a_base_model(source, base_model):
    assert base_model_of(source) == base_model
    meta = front_matter(render_model_card(REPORT, {**SPEC, "model": {"source": source}}))
    if base_model is None:  # a path or bucket is no Hub id, and a relation without a base model means nothing
        assert {"base_model", "base_model_relation"}.isdisjoint(meta)
    else:
        assert (meta["base_model"], meta["base_model_relation"]) == (base_model, "quantized")


def test_card_names_source_revision_calibration_data_and_window_hashes():
    card = render_model_card(REPORT, SPEC)
    assert "# tiny\n" in card
    assert ("GPTQ 4-bit checkpoint (format `gptq`) of `synthetic://llama-tiny` (revision `666666666666`), "
            "written by rayquant:0.1.0.") in card
    assert f"| revision | `{'6' * 64}` |" in card
    assert "| calibration dataset | `builtin://text` (builtin, packing `concat`, min_length 0) |" in card
    assert "| records | 1 used, 0 dropped (shorter than min_length), 1 held out for evaluation |" in card
    assert "| calibration windows | 2 windows of 256 tokens, seed 7 |" in card
    assert f"| windows sha256 | `{'7' * 64}` |" in card
    assert "| override `+:.*down_proj` | bits=8 |" in card and "| override `-:.*o_proj` | not quantized |" in card


def test_evaluation_table_has_each_perplexity_and_how_much_of_rtns_increase_gptq_removes():
    card = render_model_card(REPORT, SPEC)
    assert "Perplexity on 8 held-out windows of 256 tokens" in card and f"`{'5' * 64}`" in card
    assert "| fp_ppl | 1042.9 | the source model, unquantized |" in card
    assert "| gptq_ppl | 1043.7 | this checkpoint (GPTQ) |" in card
    assert "| rtn_ppl | 1050 |" in card and "| ppl_delta | 0.8 | gptq_ppl - fp_ppl |" in card
    assert "GPTQ removes 89 % of RTN's perplexity increase." in card  # (1050 - 1043.7) / (1050 - 1042.9)
    no_rtn = render_model_card(replace(REPORT, eval=replace(REPORT.eval, rtn_ppl=None)), SPEC)
    assert "| rtn_ppl |" not in no_rtn and "GPTQ removes" not in no_rtn


def test_card_without_evaluation_says_it_was_not_measured_and_how_to_measure_it():
    card = render_model_card(replace(REPORT, eval=None), SPEC)
    assert "| gptq_ppl |" not in card
    assert "Not measured in the quantization pass (calibration.eval_samples: 0); `rayquant eval <output>`" in card


def test_layer_summary_gives_the_distribution_per_kind_the_worst_layers_and_links_the_picture():
    layers = [layer(b, kind, ratio) for b, ratios in enumerate([(0.2, 0.4), (0.3, 0.9), (0.5, 1.25), (0.1, 0.6)])
              for kind, ratio in zip(("mlp.down_proj", "self_attn.q_proj"), ratios)]
    layers += [layer(b, "mlp.up_proj", 0.05 * (b + 1)) for b in range(4)] + [layer(4, "mlp.up_proj", 0.0, 0.0)]
    card = render_model_card(replace(REPORT, layers=tuple(sorted(layers, key=lambda x: x.name))), SPEC)
    assert ("Quantized linears: 13. GPTQ / RTN: median 0.2500, max 1.2500 (`model.layers.2.self_attn.q_proj`); "
            "1 at or above 1.") in card
    assert "1 of them have RTN loss 0 (no ratio)." in card
    assert "![GPTQ / RTN loss per layer, by block](loss-ratio.png)" in card
    assert "| mlp.down_proj | 4 | 0.2500 | 0.5000 |" in card and "| self_attn.q_proj | 4 | 0.7500 | 1.2500 |" in card
    assert "| mlp.up_proj | 4 | 0.1250 | 0.2000 |" in card
    rows = [line.split(" | ")[0][2:] for line in card.splitlines() if line.startswith("| model.layers.")]
    assert rows == ["model.layers.2.self_attn.q_proj", "model.layers.1.self_attn.q_proj",
                    "model.layers.3.self_attn.q_proj", "model.layers.2.mlp.down_proj",
                    "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj",
                    "model.layers.0.mlp.down_proj", "model.layers.3.mlp.up_proj", "model.layers.2.mlp.up_proj",
                    "model.layers.1.mlp.up_proj"][:WORST_LAYERS]  # ties in name order
    assert "| model.layers.1.self_attn.q_proj | 0.9 | 1 | 0.9000 | 0.01 | 8192 | 0 |" in card


def test_expert_layers_report_starved_experts_and_that_transformers_cannot_load_them():
    card = render_model_card(REPORT, SPEC)
    assert f"| {EXPERT.name} | 0.25 | 1 | 0.2500 | 0.02 | 4096 | 3e-07 |" in card
    assert "Starved experts (routed fewer calibration tokens than quant.moe.min_tokens): 1 linear, given " \
           "`calibrate_all`." in card
    assert "does not load the experts of a mixture-of-experts model" in card
    dense = render_model_card(replace(REPORT, layers=(DENSE,)), SPEC)
    assert "Starved experts" not in dense and "mixture-of-experts" not in dense


@pytest.mark.parametrize("uri, target", [
    (None, LoadTarget("path/to/tiny", None, False)),
    ("./outputs/tiny-w4", LoadTarget("path/to/tiny", None, False)),  # where it was written says nothing elsewhere
    ("hf://org/tiny-w4", LoadTarget("org/tiny-w4", None, False)),
    ("hf://org/tiny-w4@v1", LoadTarget("org/tiny-w4", "v1", False)),
    ("s3://bucket/models/tiny-w4/", LoadTarget("s3://bucket/models/tiny-w4", None, True)),
])
def test_load_target_is_the_form_each_loader_takes(uri, target):
    assert load_target(uri, "tiny") == target


def test_load_section_for_a_hub_output_shows_transformers_and_vllm_with_the_repo_id():
    card = render_model_card(replace(REPORT, quantization=replace(QUANT, dynamic=None)),
                             {**SPEC, "output": {"uri": "hf://org/tiny-w4@v1"}})
    assert ('model = AutoModelForCausalLM.from_pretrained("org/tiny-w4", revision="v1", '
            'quantization_config=GPTQConfig(bits=4, backend="torch"))') in card
    assert "vllm serve org/tiny-w4 --revision v1\n" in card and 'llm = LLM(model="org/tiny-w4", revision="v1")' in card
    assert "These settings suit vLLM's GPTQ Marlin kernels" in card and "ignores the per-module overrides" not in card


def test_load_section_for_an_s3_output_copies_for_transformers_and_streams_for_vllm():
    card = render_model_card(REPORT, {**SPEC, "output": {"uri": "s3://bucket/models/tiny-w4"}})
    assert "(`aws s3 cp --recursive s3://bucket/models/tiny-w4/ ./tiny/`)" in card
    assert 'AutoModelForCausalLM.from_pretrained("./tiny", quantization_config' in card
    assert "vllm serve s3://bucket/models/tiny-w4 --load-format runai_streamer\n" in card
    assert 'llm = LLM(model="s3://bucket/models/tiny-w4", load_format="runai_streamer")' in card
    assert "GPTQModel.load(\"./tiny\")" in card  # overrides: transformers' GPTQ path ignores them


def test_settings_outside_vllms_marlin_kernels_are_named_in_the_card():
    assert vllm_problems(replace(QUANT, dynamic=None)) == []
    assert vllm_problems(replace(QUANT, bits=3, sym=False, group_size=256, dynamic=None)) == [
        "bits=3, sym=false: Marlin takes 4- or 8-bit symmetric weights",
        "group_size=256: Marlin takes -1, 32, 64 or 128",
    ]
    assert vllm_problems(replace(QUANT, desc_act=True, act_group_aware=False, dynamic=None))[0].startswith(
        "desc_act=true with groups")
    assert vllm_problems(replace(QUANT, desc_act=True, group_size=-1, dynamic=None)) == []  # no groups to order
    overridden = replace(QUANT, dynamic={"+:.*down_proj": {"bits": 2}, "-:.*o_proj": {}})
    assert vllm_problems(overridden) == ["override '+:.*down_proj': bits=2, sym=true: Marlin takes 4- or 8-bit "
                                         "symmetric weights"]
    card = render_model_card(replace(REPORT, quantization=overridden), SPEC)
    assert "vLLM 0.32 will not load these settings: override '+:.*down_proj': bits=2" in card
    assert "Load it with transformers or GPTQModel instead." in card


def test_no_credential_reaches_the_card_or_its_picture(monkeypatch):
    secret, token = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY", "hf_SeCrEtToKeN0123456789"
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", token)
    spec = {**SPEC, "model": {"source": f"s3://AKIAEXAMPLE:{secret}@bucket/models/src"},
            "output": {"uri": f"s3://AKIAEXAMPLE:{token}@bucket/models/out"}}
    report = replace(REPORT, calibration_dataset=replace(REPORT.calibration_dataset,
                                                         source=f"s3://AKIAEXAMPLE:{secret}@bucket/data.txt"))
    card = render_model_card(report, spec)
    assert "`s3://bucket/models/src`" in card and "vllm serve s3://bucket/models/out" in card
    assert "`s3://bucket/data.txt`" in card
    assert secret not in card and token not in card and "AKIAEXAMPLE" not in card
    png = render_loss_ratio_png(report)
    assert secret.encode() not in png and token.encode() not in png


def test_same_inputs_give_the_same_card_and_nothing_of_the_run_enters_it():
    card = render_model_card(REPORT, HUB_SPEC)
    assert card == render_model_card(REPORT, HUB_SPEC)
    assert card != render_model_card(replace(REPORT, layers=(DENSE,)), HUB_SPEC)
    assert "seconds" not in card and re.search(r"\d{4}-\d{2}-\d{2}", card) is None  # no timings, no dates

"""MoE families end to end on 2 CPU workers: every expert its own input group, owners spread over the
workers, routed token counts in the report, the starved-expert policies, and the output read back by an
independent loader whose logits beat RTN's.

The reader: transformers' GPTQ path (optimum) cannot load any MoE output in transformers 5 (its
experts are fused 3-D parameters, not nn.Linear, so optimum replaces none of them: every per-expert
qweight is "unexpected" and gate_up_proj/down_proj stay randomly initialised). GPTQModel's own loader
unfuses the experts first (its `defuser`) and reads qwen2/qwen3-MoE and DeepSeek-V2/V3 outputs. For
Mixtral it requires the names of its unfused module (`mlp.experts.{e}.gate_proj`) and rejects the Hub
naming `block_sparse_moe.experts.{e}.w1` ("Missing required quantized weights"), which is what
transformers' save_pretrained and vLLM's Mixtral loader use and what rayquant writes; Mixtral is read by
dequantizing the output into a plain checkpoint that transformers' own from_pretrained loads (its
conversion mapping fuses the experts again).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

from rayquant.solver.gptq import GPTQConfig
from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed, packed_bits
from rayquant.solver.rtn import rtn_weight
from rayquant.storage.calibration import load_calibration
from rayquant.storage.gptq_checkpoint import open_gptq_checkpoint
from rayquant.storage.model_source import open_model_source
from rayquant.storage.synthetic import STARVED_EXPERTS
from rayquant.workers.adapter import ROUTER_NAMES
from rayquant.workers.checkpoint_eval import load_dequantized_model

from .models import fp_model, logit_mse, logits
from .quantize_jobs import selected_params

pytestmark = pytest.mark.slow

CFG = GPTQConfig(bits=4, group_size=128, sym=True)  # tiny-llama.yaml's settings
N_TOKENS = 32 * 256  # calibration.n_samples x seq_len of tiny-llama.yaml
TOP_K = 2  # num_experts_per_tok of every MoE preset
STARVED = "deepseek-v3-starved-tiny"  # experts STARVED_EXPERTS never routed to


def _sets(family: str, policy: str | None = None) -> tuple[str, ...]:
    """The job's `--set`s: the family's model, and the starved-expert policy if given."""
    policy_set = () if policy is None else (f"quant.moe.starved_experts={policy}",)
    return (f"model.source=synthetic://{family}", *policy_set)


@pytest.fixture(scope="module", autouse=True)
def jobs_in_background(quantize_once, request):
    for family in selected_params(request, "family"):
        quantize_once.start(*_sets(family))
    for policy in selected_params(request, "policy"):
        quantize_once.start(*_sets(STARVED, policy))
    yield
    quantize_once.finish()


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(directory / shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def _quantizable(source: Path) -> set[str]:
    """Every linear of the source's blocks under its checkpoint name, routers and gates excepted."""
    return {name.removesuffix(".weight") for name, t in _read_tensors(source).items()
            if ".layers." in name and name.endswith(".weight") and t.dim() == 2
            and name.removesuffix(".weight").rpartition(".")[2] not in ROUTER_NAMES}


def _dequantized(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The output's tensors with every packed linear replaced by its dequantized `.weight`."""
    tensors = _read_tensors(checkpoint)
    out = {k: v for k, v in tensors.items() if k.rpartition(".")[2] not in PACKED_FIELDS}
    for name in [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]:
        packed = PackedLinear(**{f: tensors[f"{name}.{f}"] for f in PACKED_FIELDS})
        out[f"{name}.weight"] = dequantize_packed(packed, packed_bits(packed)).float().contiguous()
    return out


def _dequantized_model(checkpoint: Path, tmp: Path) -> torch.nn.Module:
    """transformers' from_pretrained of the dequantized output (per-expert names fused by its own mapping)."""
    tmp.mkdir()
    save_file(_dequantized(checkpoint), tmp / "model.safetensors", {"format": "pt"})
    config = json.loads((checkpoint / "config.json").read_text())
    config.pop("quantization_config")
    (tmp / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32).eval()


def _rtn_model(source: Path) -> torch.nn.Module:
    """RTN of every quantized linear: block nn.Linears (routers excepted) and each expert's rows of the
    fused [E, N, K] parameters (RTN rounds rows independently, so gate_up_proj[e] = gate and up)."""
    model = fp_model(source)
    with torch.no_grad():
        for name, mod in model.named_modules():
            if ".layers." not in name:
                continue
            if isinstance(mod, torch.nn.Linear) and name.rpartition(".")[2] not in ROUTER_NAMES:
                mod.weight.copy_(rtn_weight(mod.weight, CFG))
            for p in mod.parameters(recurse=False):
                if p.dim() == 3:
                    p.copy_(torch.stack([rtn_weight(w, CFG) for w in p]))
    return model


@pytest.mark.parametrize("family", ["mixtral-tiny", "qwen2-moe-tiny", "qwen3-moe-tiny", "deepseek-v2-tiny",
                                    "deepseek-v3-tiny"])
def test_moe_family_quantizes_every_expert_and_beats_rtn_through_an_independent_loader(family, quantize_once,
                                                                                      tmp_path):
    from .gptq_loader import gptqmodel_logits, load_gptqmodel

    out = quantize_once(*_sets(family)).output()
    source = open_model_source(f"synthetic://{family}").path
    layers = json.loads((out / "report.json").read_text())["layers"]

    # one packed linear per source linear, under the source checkpoint's names; routers stay fp
    assert {x["name"] for x in layers} == _quantizable(source)
    written = _read_tensors(out)
    assert all(f"{x['name']}.qweight" in written and f"{x['name']}.weight" not in written for x in layers)
    assert all(x["gptq_loss"] < x["rtn_loss"] for x in layers)

    experts = [x for x in layers if ".experts." in x["name"]]
    # quant.moe.hessian_tokens=routed (the default): each expert's Hessians over the tokens routed to it
    assert experts and all(0 < x["n_tokens"] == x["routed_tokens"] < N_TOKENS and x["starved_policy"] is None
                           for x in experts)
    assert {x["owner"] for x in experts} == {0, 1}  # expert Hessians are spread over both workers
    down = [x for x in experts if x["input_group"].count("+") == 0]  # one linear per expert: w2 / down_proj
    for block in {x["name"].split(".experts.")[0] for x in down}:
        routed = [x["routed_tokens"] for x in down if x["name"].startswith(block + ".experts.")]
        assert sum(routed) == N_TOKENS * TOP_K, block  # every token goes to exactly top-k experts

    ids = load_calibration("builtin://text", source, 32, 256, 8, 0).eval_samples
    fp = logits(fp_model(source), ids)
    rtn = logits(_rtn_model(source), ids)
    dequantized = logits(_dequantized_model(out, tmp_path / "dequantized"), ids)
    # `rayquant eval`'s reader unfuses the experts as the workers do and computes what transformers does
    evaluated = logits(load_dequantized_model(open_gptq_checkpoint(str(out))), ids)
    assert logit_mse(evaluated, dequantized) < 1e-4 * logit_mse(dequantized, fp)
    if family == "mixtral-tiny":  # GPTQModel rejects the Hub's Mixtral names: see the module docstring
        loaded = dequantized
    else:
        loaded = gptqmodel_logits(load_gptqmodel(out), ids)
        # two independent readers agree: names and packing mean the same to transformers and GPTQModel
        # (not to float rounding: GPTQModel runs its own MoE forward, and a token whose top-k experts
        # nearly tie may pick another one; measured 2% of the quantization error for DeepSeek-V3's
        # sigmoid group-limited router, under 0.1% for the others)
        assert logit_mse(loaded, dequantized) < 0.05 * logit_mse(dequantized, fp)
    assert logit_mse(loaded, fp) < logit_mse(rtn, fp)


@pytest.mark.parametrize("policy", ["error", "calibrate_all", "rtn"])
def test_expert_the_router_never_picks_gets_the_starved_policy(policy, quantize_once):
    run = quantize_once(*_sets(STARVED, policy))
    proc, out = run.proc, run.out
    if policy == "error":
        assert proc.returncode == 2, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        assert last.startswith("error: StarvedExpert: block 1:")
        assert "mlp.experts.6.gate_proj+up_proj': 0" in last and "quant.moe.starved_experts" in last
        assert not out.exists() or not any(out.iterdir())
        return
    assert proc.returncode == 0, proc.stderr[-3000:]
    layers = json.loads((out / "report.json").read_text())["layers"]
    experts = [x for x in layers if ".experts." in x["name"]]
    starved = [x for x in experts if int(x["name"].split(".experts.")[1].split(".")[0]) in STARVED_EXPERTS]
    fed = [x for x in experts if x not in starved]
    assert len(starved) == 3 * 3 * len(STARVED_EXPERTS)  # 3 MoE blocks x 3 linears per expert
    assert all(x["routed_tokens"] == 0 and x["starved_policy"] == policy for x in starved)
    assert all(x["routed_tokens"] > 0 and x["starved_policy"] is None for x in fed)
    # hessian_tokens=routed: the starved experts' Hessians collected again over all tokens, the fed ones' routed
    assert all(x["n_tokens"] == N_TOKENS for x in starved)
    assert all(x["n_tokens"] == x["routed_tokens"] for x in fed)
    if policy == "calibrate_all":
        assert all(x["gptq_loss"] < x["rtn_loss"] for x in layers)
        return
    assert all(x["gptq_loss"] == x["rtn_loss"] for x in starved)
    assert all(x["gptq_loss"] < x["rtn_loss"] for x in layers if x not in starved)
    source = _read_tensors(open_model_source(f"synthetic://{STARVED}").path)
    written = _dequantized(out)
    for x in starved:  # the packed codes are RTN's rounding of the source weight
        name = x["name"] + ".weight"
        expected = rtn_weight(source[name].float(), CFG)
        torch.testing.assert_close(written[name].float(), expected, atol=1e-2 * float(expected.abs().max()), rtol=0)

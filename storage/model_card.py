"""The model card (README.md) of a GPTQ checkpoint: what was quantized from what, how well, how to load it.

The Hub reads the YAML front matter (base model, library, pipeline, tags, the quantization settings);
the body holds the source and calibration data, the perplexities, a per-layer summary with the
loss-ratio picture (storage/loss_plot.py; the full per-layer data is report.json's) and how to load
the output with transformers and vLLM. The card is listed in the manifest, so it is a pure function of
the report and the resolved spec: no timestamps, no timings, nothing read from the environment.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

import yaml

from rayquant.storage.job_records import CHECKPOINT_FORMAT, EvalReport, JobReport, QuantizationConfig
from rayquant.storage.loss_plot import LayerRatio, layer_ratios
from rayquant.storage.output_layout import LOSS_PLOT_FILE

WORST_LAYERS = 10  # rows of the worst-layers table: enough to spot a pattern, short beside report.json
# vLLM 0.32 reads GPTQ through its Marlin kernels only (auto_gptq.py TYPE_MAP, marlin_utils.py)
VLLM_BITS_SYM = ((4, True), (8, True))
VLLM_GROUP_SIZES = (-1, 32, 64, 128)
_QUANTIZATION_KEYS = ("bits", "group_size", "sym", "desc_act", "act_group_aware", "damp_percent", "true_sequential",
                      "static_groups")


@dataclass(frozen=True)
class LoadTarget:
    """Where a reader of the card loads the output from, in the form each loader takes."""

    path: str  # a Hub repo id, an s3:// URI or a local directory
    revision: str | None  # a Hub branch or commit, when the output URI names one
    on_s3: bool


def render_model_card(report: JobReport, resolved_spec: dict) -> str:
    """README.md: YAML front matter for the Hub, then source, calibration, evaluation, layer errors and loading."""
    source = _shown_uri(resolved_spec.get("model", {}).get("source", "(unknown)"))
    target = load_target(resolved_spec.get("output", {}).get("uri"), report.job)
    lines = [
        *_front_matter(report.quantization, source),
        "",
        f"# {report.job}",
        "",
        f"GPTQ {report.quantization.bits}-bit checkpoint (format `{CHECKPOINT_FORMAT}`) of `{source}` "
        f"(revision `{report.source_revision[:12]}`), written by {report.quantization.quantizer}.",
        *_settings_lines(report.quantization),
        *_source_lines(report, resolved_spec, source),
        *_evaluation_lines(report.eval),
        *_layer_lines(report),
        *_load_lines(report, target),
    ]
    return "\n".join(lines) + "\n"


def base_model_of(source: str) -> str | None:
    """The Hub id the card names as `base_model`: `org/name` of an `hf://org/name@revision` source.

    Local, s3:// and synthetic:// sources have none: the Hub accepts only a model id there, and a path on
    the machine that ran the job or a bucket is not one (a local copy of a Hub model is not recognised).
    """
    if not source.startswith("hf://"):
        return None
    return source.removeprefix("hf://").split("@", 1)[0].strip("/") or None


def load_target(output_uri: str | None, job: str) -> LoadTarget:
    """The output as a loader takes it: the repo id of `hf://org/name[@revision]`, an `s3://` URI as given,
    else (a local directory, or no URI) `path/to/<job>`: a path of the machine that ran the job says
    nothing to a reader elsewhere, and leaving it out keeps the card's bytes independent of where it went."""
    if output_uri is not None and output_uri.startswith("hf://"):
        repo, _, revision = output_uri.removeprefix("hf://").partition("@")
        return LoadTarget(path=repo.strip("/"), revision=revision or None, on_s3=False)
    if output_uri is not None and output_uri.startswith("s3://"):
        return LoadTarget(path=_shown_uri(output_uri).rstrip("/"), revision=None, on_s3=True)
    return LoadTarget(path=f"path/to/{job}", revision=None, on_s3=False)


def vllm_problems(quantization: QuantizationConfig) -> list[str]:
    """Why vLLM 0.32 would refuse these settings (empty: it loads them through its GPTQ Marlin kernels)."""
    problems = _marlin_problems(quantization.bits, quantization.sym, quantization.group_size, "")
    if quantization.desc_act and quantization.group_size != -1:
        problems.append("desc_act=true with groups: vLLM no longer loads group act-order "
                        "(act_group_aware, the default, keeps g_idx sequential and loads)")
    for pattern, fields_ in (quantization.dynamic or {}).items():
        if not pattern.startswith("-:"):
            problems += _marlin_problems(fields_.get("bits", quantization.bits), quantization.sym,
                                         fields_.get("group_size", quantization.group_size), f"override {pattern!r}: ")
    return problems


def _marlin_problems(bits: int, sym: bool, group_size: int, where: str) -> list[str]:
    problems = []
    if (bits, sym) not in VLLM_BITS_SYM:
        problems.append(f"{where}bits={bits}, sym={str(sym).lower()}: Marlin takes 4- or 8-bit symmetric weights")
    if group_size not in VLLM_GROUP_SIZES:
        problems.append(f"{where}group_size={group_size}: Marlin takes -1, 32, 64 or 128")
    return problems


def _front_matter(quantization: QuantizationConfig, source: str) -> list[str]:
    """The YAML block the Hub reads; `base_model` (and its relation) only where the source is a Hub model."""
    meta: dict = {}
    base_model = base_model_of(source)
    if base_model is not None:  # a relation needs a base model to relate to
        meta.update(base_model=base_model, base_model_relation="quantized")
    meta.update(library_name="transformers", pipeline_tag="text-generation",
                tags=["gptq", f"{quantization.bits}-bit", "rayquant"])
    settings = {"quant_method": "gptq", **{key: getattr(quantization, key) for key in _QUANTIZATION_KEYS},
                "checkpoint_format": CHECKPOINT_FORMAT}
    if quantization.dynamic:
        settings["dynamic"] = quantization.dynamic
    meta["quantization_config"] = settings
    # insertion order, no line folding: the same settings give the same bytes
    text = yaml.safe_dump(meta, sort_keys=False, default_flow_style=False, width=2**16, allow_unicode=True)
    return ["---", *text.splitlines(), "---"]


def _settings_lines(quantization: QuantizationConfig) -> list[str]:
    lines = ["", "## Quantization", "", "| setting | value |", "|---|---|"]
    lines += [f"| {key} | {_format_value(getattr(quantization, key))} |" for key in _QUANTIZATION_KEYS]
    for pattern, fields_ in (quantization.dynamic or {}).items():
        what = "not quantized" if pattern.startswith("-:") else ", ".join(f"{k}={v}" for k, v in fields_.items())
        lines.append(f"| override `{pattern}` | {what} |")
    return lines


def _source_lines(report: JobReport, resolved_spec: dict, source: str) -> list[str]:
    """The source and the calibration data, with the hashes that identify the windows."""
    data = report.calibration_dataset
    calibration = resolved_spec.get("calibration", {})
    windows = f"{len(report.calibration_window_sha256s)} windows"
    if "seq_len" in calibration:
        windows += f" of {calibration['seq_len']} tokens"
    if "seed" in calibration:
        windows += f", seed {calibration['seed']}"
    return [
        "", "## Source and calibration data", "",
        "| | |", "|---|---|",
        f"| source | `{source}` |",
        f"| revision | `{report.source_revision}` |",
        f"| calibration dataset | `{_shown_uri(data.source)}` ({data.kind}, packing `{data.packing}`, "
        f"min_length {data.min_length}) |",
        f"| records | {data.records_used} used, {data.records_dropped} dropped (shorter than min_length), "
        f"{data.records_held_out} held out for evaluation |",
        f"| calibration windows | {windows} |",
        f"| windows sha256 | `{report.calibration_windows_sha256}` |",
        "",
        "The sha256 is of all calibration windows as contiguous int64 token ids; report.json lists one per window.",
    ]


def _evaluation_lines(evaluation: EvalReport | None) -> list[str]:
    lines = ["", "## Evaluation", ""]
    if evaluation is None:
        return lines + ["Not measured in the quantization pass (calibration.eval_samples: 0); "
                        "`rayquant eval <output>` measures the perplexity of this checkpoint."]
    metrics = evaluation.metrics()
    labels = {"fp_ppl": "the source model, unquantized", "gptq_ppl": "this checkpoint (GPTQ)",
              "rtn_ppl": "round-to-nearest on the same grid, the baseline GPTQ improves on",
              "ppl_delta": "gptq_ppl - fp_ppl"}
    lines += [
        f"Perplexity on {evaluation.n_windows} held-out windows of {evaluation.seq_len} tokens "
        f"(never used for calibration; {evaluation.n_tokens} predicted tokens, windows sha256 "
        f"`{evaluation.windows_sha256}`), measured in the quantization pass itself.",
        "", "| metric | value | |", "|---|---:|---|",
        *(f"| {key} | {_format_value(metrics[key])} | {labels[key]} |" for key in labels if key in metrics),
    ]
    if evaluation.rtn_ppl is not None and evaluation.rtn_ppl > evaluation.fp_ppl:
        kept = (evaluation.rtn_ppl - evaluation.gptq_ppl) / (evaluation.rtn_ppl - evaluation.fp_ppl)
        lines += ["", f"GPTQ removes {100 * kept:.0f} % of RTN's perplexity increase."]
    return lines


def _layer_lines(report: JobReport) -> list[str]:
    """The ratio's distribution, overall and per linear kind, the worst layers, the picture."""
    ratios = layer_ratios(report.layers)
    defined = [r for r in ratios if r.ratio is not None]
    lines = [
        "", "## Layer errors", "",
        "Layer loss is tr((W - Q) H (W - Q)^T) on the calibration activations; RTN is round-to-nearest on the "
        "same grid, the baseline GPTQ improves on. GPTQ / RTN below 1 means GPTQ did better. "
        "report.json holds every layer's record.",
        "",
    ]
    if defined:
        worst = max(defined, key=lambda r: (r.ratio, r.name))
        above = sum(r.ratio >= 1 for r in defined)
        lines.append(f"Quantized linears: {len(ratios)}. GPTQ / RTN: median "
                     f"{statistics.median(r.ratio for r in defined):.4f}, max {worst.ratio:.4f} (`{worst.name}`); "
                     f"{above} at or above 1.")
    if len(defined) < len(ratios):
        lines += ["", f"{len(ratios) - len(defined)} of them have RTN loss 0 (no ratio)."]
    lines += _starved_lines(report)
    lines += ["", f"![GPTQ / RTN loss per layer, by block]({LOSS_PLOT_FILE})"]
    lines += _kind_table(defined) + _worst_table(report, defined)
    return lines


def _starved_lines(report: JobReport) -> list[str]:
    policies = sorted({layer.starved_policy for layer in report.layers if layer.starved_policy is not None})
    starved = sum(layer.starved_policy is not None for layer in report.layers)
    if not starved:
        return []
    return ["", f"Starved experts (routed fewer calibration tokens than quant.moe.min_tokens): {starved} "
            f"linear{'s' if starved != 1 else ''}, given {', '.join(f'`{p}`' for p in policies)}."]


def _kind_table(defined: list[LayerRatio]) -> list[str]:
    lines = ["", "| linear | layers | median GPTQ / RTN | max GPTQ / RTN |", "|---|---:|---:|---:|"]
    for kind in sorted({r.kind for r in defined}):
        values = [r.ratio for r in defined if r.kind == kind]
        lines.append(f"| {kind} | {len(values)} | {statistics.median(values):.4f} | {max(values):.4f} |")
    return lines


def _worst_table(report: JobReport, defined: list[LayerRatio]) -> list[str]:
    """The layers with the highest GPTQ / RTN ratio. Tokens: calibration tokens behind the layer's Hessian;
    kernel error: the largest relative difference between the packed tensors' matmul and the dequantized weights."""
    worst = sorted(defined, key=lambda r: (-r.ratio, r.name))[:WORST_LAYERS]
    records = {layer.name: layer for layer in report.layers}
    lines = [
        "", f"The {len(worst)} layers with the highest GPTQ / RTN ratio (tokens: calibration tokens behind the "
        "layer's Hessian; kernel error: largest relative difference between the packed tensors' matmul and the "
        "dequantized weights):",
        "", "| layer | GPTQ loss | RTN loss | GPTQ / RTN | damp_percent | tokens | kernel error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for ratio in worst:
        layer = records[ratio.name]
        lines.append(f"| {layer.name} | {layer.gptq_loss:.6g} | {layer.rtn_loss:.6g} | {ratio.ratio:.4f} "
                     f"| {layer.damp_percent:.4g} | {layer.n_tokens} | {_format_value(layer.max_rel_err)} |")
    return lines


def _load_lines(report: JobReport, target: LoadTarget) -> list[str]:
    return ["", "## Load it", "", "### transformers", "", *_transformers_lines(report, target),
            "", "### vLLM", "", *_vllm_lines(report.quantization, target)]


def _transformers_lines(report: JobReport, target: LoadTarget) -> list[str]:
    bits = report.quantization.bits
    path = target.path
    lines = ["transformers reads GPTQ through optimum and GPTQModel (`pip install optimum gptqmodel`)."]
    if target.on_s3:
        path = f"./{report.job}"
        lines[0] += (f" It reads local directories and Hub repositories, not S3: copy the output first "
                     f"(`aws s3 cp --recursive {target.path}/ {path}/`).")
    revision = f", revision={_quoted(target.revision)}" if target.revision else ""
    lines += [
        "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer, GPTQConfig", "",
        f"model = AutoModelForCausalLM.from_pretrained({_quoted(path)}{revision}, "
        f"quantization_config=GPTQConfig(bits={bits}, backend=\"torch\"))",
        f"tokenizer = AutoTokenizer.from_pretrained({_quoted(path)}{revision})", "```", "",
        f"`bits` must be this checkpoint's ({bits}); the torch backend also runs on CPU.",
    ]
    if report.quantization.dynamic:
        lines += ["", "transformers' GPTQ path ignores the per-module overrides (`dynamic`): load this checkpoint "
                  f"with GPTQModel (`GPTQModel.load({_quoted(path)})`) or vLLM."]
    if any(layer.routed_tokens is not None for layer in report.layers):
        lines += ["", "transformers' GPTQ path does not load the experts of a mixture-of-experts model: load this "
                  "checkpoint with GPTQModel or vLLM."]
    return lines


def _vllm_lines(quantization: QuantizationConfig, target: LoadTarget) -> list[str]:
    serve = f"vllm serve {target.path}"
    options = ""
    if target.revision:
        serve, options = f"{serve} --revision {target.revision}", f", revision={_quoted(target.revision)}"
    if target.on_s3:  # vLLM streams s3:// through the Run:ai Model Streamer (pip install 'vllm[runai]')
        serve, options = f"{serve} --load-format runai_streamer", f"{options}, load_format=\"runai_streamer\""
    lines = ["```bash", serve, "```", "", "```python", "from vllm import LLM", "",
             f"llm = LLM(model={_quoted(target.path)}{options})", "```", ""]
    if target.on_s3:
        lines += ["Reading s3:// needs vLLM's Run:ai streamer extra (`pip install 'vllm[runai]'`) and the "
                  "AWS_* environment variables of the bucket.", ""]
    problems = vllm_problems(quantization)
    if not problems:
        return lines + ["These settings suit vLLM's GPTQ Marlin kernels (4- or 8-bit symmetric, group size -1, 32, "
                        "64 or 128)."]
    return lines + ["vLLM 0.32 will not load these settings: " + "; ".join(problems)
                    + ". Load it with transformers or GPTQModel instead."]


def _shown_uri(uri: str) -> str:
    """uri without a `user:secret@` part: a credential written into a URI never reaches the card."""
    parts = urlsplit(uri)
    userinfo, at, host = parts.netloc.rpartition("@")
    if not parts.scheme or not at or ":" not in userinfo:  # hf://name@revision has no `:` before its `@`
        return uri
    return urlunsplit(parts._replace(netloc=host))


def _quoted(text: str) -> str:
    return json.dumps(text)  # a Python string literal in double quotes, as the card's other code writes


def _format_value(value: object) -> str:
    if isinstance(value, bool):
        return str(value).lower()  # as the spec and config.json write it
    return f"{value:.6g}" if isinstance(value, float) else str(value)

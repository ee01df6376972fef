"""The model card (README.md) of a GPTQ checkpoint: what was quantized how, and how well."""

from __future__ import annotations

from rayquant.storage.job_records import CHECKPOINT_FORMAT, EvalReport, JobReport


def render_model_card(report: JobReport, resolved_spec: dict) -> str:
    """README.md: what was quantized how, and each layer's GPTQ loss beside its RTN baseline."""
    model_source = resolved_spec.get("model", {}).get("source", "(unknown)")
    quantization = report.quantization
    settings = ", ".join(
        f"{key}={getattr(quantization, key)}"
        for key in ("bits", "group_size", "desc_act", "sym", "static_groups", "true_sequential", "damp_percent")
    )
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- gptq",
        "- rayquant",
        "---",
        "",
        f"# {resolved_spec.get('name', 'GPTQ checkpoint')}",
        "",
        f"GPTQ {quantization.bits}-bit checkpoint (format `{CHECKPOINT_FORMAT}`) "
        f"of `{model_source}` (revision `{report.source_revision[:12]}`), written by {quantization.quantizer}.",
        "",
        f"Quantization: {settings}.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        "```",
    ]
    if report.eval is not None:
        lines += _evaluation_lines(report.eval)
    lines += [
        "",
        "## Layer errors",
        "",
        "Layer loss is tr((W - Q) H (W - Q)^T) on the calibration activations; RTN is round-to-nearest "
        "on the same grid, the baseline GPTQ improves on.",
        "",
        "Tokens are the calibration tokens behind the layer's Hessian; kernel error is the largest relative "
        "difference between the GPU kernel (or the CPU reference) on the packed tensors and the dequantized "
        "weights.",
        "",
        "| layer | GPTQ loss | RTN loss | GPTQ / RTN | damp_percent | tokens | kernel error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for layer in report.layers:
        ratio = layer.gptq_loss / layer.rtn_loss if layer.rtn_loss else float("nan")
        lines.append(
            f"| {layer.name} | {layer.gptq_loss:.6g} | {layer.rtn_loss:.6g} | {ratio:.4f} "
            f"| {layer.damp_percent:.4g} | {layer.n_tokens} | {_format_value(layer.max_rel_err)} |"
        )
    return "\n".join(lines) + "\n"


def _evaluation_lines(evaluation: EvalReport) -> list[str]:
    metrics = evaluation.metrics()
    return [
        "", "## Evaluation", "",
        f"Perplexity on {evaluation.n_windows} held-out windows of {evaluation.seq_len} tokens "
        "(never used for calibration), measured in the quantization pass itself.",
        "", "| metric | value |", "|---|---|",
        *(f"| {key} | {_format_value(metrics[key])} |" for key in sorted(metrics)),
    ]


def _format_value(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)

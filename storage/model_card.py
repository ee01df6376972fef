"""The model card (README.md) of a GPTQ checkpoint: what was quantized how, and how well."""

from __future__ import annotations


def render_model_card(quantization_config: dict, report: dict, resolved_spec: dict, source_revision: str,
                      quantizer: str) -> str:
    """README.md: what was quantized how, and each layer's GPTQ loss beside its RTN baseline."""
    model_source = resolved_spec.get("model", {}).get("source", "(unknown)")
    settings = ", ".join(
        f"{key}={quantization_config[key]}"
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
        f"GPTQ {quantization_config['bits']}-bit checkpoint (format `{quantization_config['checkpoint_format']}`) "
        f"of `{model_source}` (revision `{source_revision[:12]}`), written by {quantizer}.",
        "",
        f"Quantization: {settings}.",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM",
        'model = AutoModelForCausalLM.from_pretrained("<this directory>")',
        "```",
    ]
    metrics = report.get("metrics", {})
    if metrics:
        evaluation = report.get("eval", {})
        lines += ["", "## Evaluation", ""]
        if evaluation:
            lines += [f"Perplexity on {evaluation['n_windows']} held-out windows of {evaluation['seq_len']} tokens "
                      "(never used for calibration), measured in the quantization pass itself.", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format_value(metrics[key])} |" for key in sorted(metrics)]
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
    for layer in report["layers"]:
        ratio = layer["gptq_loss"] / layer["rtn_loss"] if layer["rtn_loss"] else float("nan")
        lines.append(
            f"| {layer['name']} | {layer['gptq_loss']:.6g} | {layer['rtn_loss']:.6g} | {ratio:.4f} "
            f"| {layer['damp_percent']:.4g} | {layer.get('n_tokens', '')} | {_format_value(layer.get('max_rel_err', ''))} |"
        )
    return "\n".join(lines) + "\n"


def _format_value(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)

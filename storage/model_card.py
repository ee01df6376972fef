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
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {_format_value(metrics[key])} |" for key in sorted(metrics)]
    lines += [
        "",
        "## Layer errors",
        "",
        "Layer loss is tr((W - Q) H (W - Q)^T) on the calibration activations; RTN is round-to-nearest "
        "on the same grid, the baseline GPTQ improves on.",
        "",
        "| layer | GPTQ loss | RTN loss | GPTQ / RTN | damp_percent |",
        "|---|---:|---:|---:|---:|",
    ]
    for layer in report["layers"]:
        ratio = layer["gptq_loss"] / layer["rtn_loss"] if layer["rtn_loss"] else float("nan")
        lines.append(
            f"| {layer['name']} | {layer['gptq_loss']:.6g} | {layer['rtn_loss']:.6g} | {ratio:.4f} "
            f"| {layer['damp_percent']:.4g} |"
        )
    return "\n".join(lines) + "\n"


def _format_value(value: object) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)

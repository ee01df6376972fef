"""Per-module quantization overrides (`quant.overrides`): which GPTQConfig each linear gets, or none.

A rule is a regex on the full module name (`model.layers.1.self_attn.o_proj`), matched from the start
of the name as GPTQModel and vLLM match their `dynamic` rules (`re.match`); the first matching rule
wins, a linear no rule matches gets the job's base config. The same rules, in the same order, are
written into the checkpoint's `quantization_config["dynamic"]` so loaders see what the worker did.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from torch import nn

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.adapter import DecoderLayout


class OverrideMatchesNothing(Exception):
    """A quant.overrides pattern matches no quantizable linear of the model."""


class OverridesSplitFusedLayer(Exception):
    """quant.overrides treat the parts of a layer vLLM fuses (q/k/v, gate/up) differently."""


# Dense projections that vLLM (and SGLang) load as one merged layer; they resolve the `dynamic` rule
# for the merged name (e.g. model.layers.0.self_attn.qkv_proj), so every part and the merged name must
# resolve to the same settings (GPTQModel's FUSED_PROJECTION_UNITS, which it only warns about)
FUSED_UNITS = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass(frozen=True)
class LayerOverride:
    pattern: str  # regex on the full module name, matched from its start
    bits: int | None = None  # None = the job's quant.bits
    group_size: int | None = None  # None = the job's quant.group_size
    skip: bool = False  # keep the linear unquantized (its original `.weight`)


def layer_config(name: str, base: GPTQConfig, overrides: tuple[LayerOverride, ...]) -> GPTQConfig | None:
    """The config the linear `name` is quantized with; None when a rule skips it."""
    for rule in overrides:
        if re.match(rule.pattern, name):
            if rule.skip:
                return None
            return dataclasses.replace(
                base,
                bits=base.bits if rule.bits is None else rule.bits,
                group_size=base.group_size if rule.group_size is None else rule.group_size,
            )
    return base


def gptq_dynamic(overrides: tuple[LayerOverride, ...]) -> dict[str, dict[str, int]]:
    """GPTQModel's `dynamic` map (also read by vLLM's gptq / gptq_marlin): "-:regex" skips a module,
    "+:regex" gives it its own fields; first match wins, so the rules keep their order."""
    dynamic: dict[str, dict[str, int]] = {}
    for rule in overrides:
        if rule.skip:
            dynamic[f"-:{rule.pattern}"] = {}
        else:
            fields = {"bits": rule.bits, "group_size": rule.group_size}
            dynamic[f"+:{rule.pattern}"] = {k: v for k, v in fields.items() if v is not None}
    return dynamic


def check_overrides_match(overrides: tuple[LayerOverride, ...], linear_names: list[str]) -> None:
    """Every rule must match at least one of the model's block linears (full names).

    Raises:
        OverrideMatchesNothing: a pattern matches none; the message shows names it could match.
    """
    for i, rule in enumerate(overrides):
        if not any(re.match(rule.pattern, name) for name in linear_names):
            examples = ", ".join(linear_names[:3])
            raise OverrideMatchesNothing(
                f"quant.overrides[{i}].pattern {rule.pattern!r} matches no linear of the model; patterns are "
                f"matched from the start of full module names such as {examples}; fix the pattern "
                r"(e.g. '.*\.mlp\.down_proj') or remove the override"
            )


def block_linear_names(model: nn.Module, layout: DecoderLayout) -> list[str]:
    """Full names of every linear inside the decoder blocks (free on a meta skeleton)."""
    blocks = model.get_submodule(layout.blocks_path)
    return [f"{layout.block_prefix(b)}{name}" for b, block in enumerate(blocks)
            for name, mod in block.named_modules() if isinstance(mod, nn.Linear)]


def check_fused_units(overrides: tuple[LayerOverride, ...], base: GPTQConfig, linear_names: list[str]) -> None:
    """Layers a serving engine merges must get one config, under their own and under the merged name.

    Raises:
        OverridesSplitFusedLayer: the rules differ between the parts, or between the parts and the
            merged name; the message names both and a pattern that covers them.
    """
    names = set(linear_names)
    for name in linear_names:
        prefix, _, leaf = name.rpartition(".")
        for fused, parts in FUSED_UNITS.items():
            members = [f"{prefix}.{p}" for p in parts]
            if leaf != parts[0] or not all(m in names for m in members):
                continue
            merged = f"{prefix}.{fused}"
            configs = {m: layer_config(m, base, overrides) for m in [*members, merged]}
            if len(set(configs.values())) > 1:
                shown = {m.rsplit(".", 1)[1]: _describe(c) for m, c in configs.items()}
                raise OverridesSplitFusedLayer(
                    f"quant.overrides resolve {prefix}.{{{','.join(parts)}}} and the merged name {merged} to "
                    f"different settings {shown}; vLLM loads them as one layer and looks the rule up by the "
                    f"merged name: use one pattern covering all of them, e.g. "
                    f"'.*\\.({'|'.join(parts)}|{fused})$'"
                )


def _describe(cfg: GPTQConfig | None) -> str:
    return "skip" if cfg is None else f"bits={cfg.bits},group_size={cfg.group_size}"

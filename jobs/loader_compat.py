"""Which GPTQ loaders can read the checkpoint a spec asks for: refuse one that none reads, warn about the rest.

A rayquant checkpoint is GPTQ v1 (DESIGN.md); what limits who can serve it is the loader's kernels. The
sets below are copied from the loaders' own sources (re-check them when a pinned version moves):

- GPTQModel 7.7 (transformers 5 loads GPTQ checkpoints through it, quantizers/quantizer_gptq.py): its torch
  kernel, the fallback every platform has, `gptqmodel/nn_modules/qlinear/torch.py` `TorchLinear`:
  SUPPORTS_BITS [2..8], SUPPORTS_GROUP_SIZE [-1, 16, 32, 64, 128, 256, 512, 1024], desc_act and sym both
  ways. Faster kernels (Marlin, ExLlamaV2, Machete) read subsets of these.
- vLLM 0.32 (`vllm/model_executor/layers/quantization/auto_gptq.py`, which serves "gptq" and
  "gptq_marlin"): `TYPE_MAP` has (4, sym) and (8, sym) only; `utils/marlin_utils.py`
  MARLIN_SUPPORTED_GROUP_SIZES [-1, 32, 64, 128]; `utils/gptq_utils.py`
  normalize_and_validate_gptq_desc_act refuses desc_act=true unless group_size is -1 (also per dynamic
  rule). On CPU its Marlin path reads 4 bits only (`_query_cpu_marlin_supported_quant_types`).

Pure: no I/O, no logging; the spec validator raises what `unreadable_problem` returns and the driver
logs `loader_warnings` at job start.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rayquant.jobs.spec import JobSpec, QuantSpec  # spec.py imports this module: hints only


@dataclass(frozen=True)
class Loader:
    name: str
    bits: frozenset[int]
    group_sizes: frozenset[int]
    asym: bool  # reads sym: false (zero points stored per group)
    desc_act_with_groups: bool  # reads desc_act: true when group_size != -1 (a g_idx gather)


LOADERS = (
    Loader("GPTQModel/transformers", bits=frozenset(range(2, 9)),
           group_sizes=frozenset({-1, 16, 32, 64, 128, 256, 512, 1024}), asym=True, desc_act_with_groups=True),
    Loader("vLLM", bits=frozenset({4, 8}), group_sizes=frozenset({-1, 32, 64, 128}), asym=False,
           desc_act_with_groups=False),
)


@dataclass(frozen=True)
class CheckpointSettings:
    """The settings one part of the checkpoint is written with, as config.json tells a loader."""

    where: str  # which part of quant sets them: "base settings" or "quant.overrides[1] '.*down_proj'"
    bits: int
    group_size: int
    sym: bool
    desc_act: bool  # as written into quantization_config (group-aware act-order is written as false)


def checkpoint_settings(quant: QuantSpec) -> list[CheckpointSettings]:
    """The base settings of a QuantSpec and those of each override that quantizes (skip: none)."""
    base = CheckpointSettings("base settings", quant.bits, quant.group_size, quant.sym, quant.desc_act)
    out = [base]
    for i, rule in enumerate(quant.overrides):
        if rule.skip:
            continue
        out.append(CheckpointSettings(f"quant.overrides[{i}] {rule.pattern!r}",
                                      rule.bits if rule.bits is not None else base.bits,
                                      rule.group_size if rule.group_size is not None else base.group_size,
                                      base.sym, base.desc_act))
    return out


def why_unreadable(loader: Loader, s: CheckpointSettings) -> list[str]:
    """What in s this loader cannot read (empty: it reads it)."""
    reasons = []
    if s.bits not in loader.bits:
        reasons.append(f"bits {_listed(loader.bits)}")
    if s.group_size not in loader.group_sizes:
        reasons.append(f"group_size {_listed(loader.group_sizes)}")
    if not s.sym and not loader.asym:
        reasons.append("sym: true")
    if s.desc_act and s.group_size != -1 and not loader.desc_act_with_groups:
        reasons.append("desc_act: false (or group_size -1)")
    return reasons


def unreadable_problem(s: CheckpointSettings) -> str | None:
    """None if some loader reads s; else what to change, naming each loader's rule and the nearest value."""
    if any(not why_unreadable(loader, s) for loader in LOADERS):
        return None
    needs = "; ".join(f"{loader.name} needs {', '.join(why_unreadable(loader, s))}" for loader in LOADERS)
    hint = ""
    group_sizes = sorted(g for g in _readable_group_sizes(s) if g > 0)
    if group_sizes:
        nearest = min(group_sizes, key=lambda g: (abs(g - s.group_size), -g))  # a tie: the larger, fewer scales
        hint = f"; the nearest group_size a loader reads is {nearest}"
    return f"{_described(s)} make a checkpoint no supported loader can read ({needs}){hint}"


def loader_warnings(spec: JobSpec) -> list[str]:
    """One line per part of the checkpoint that some supported loaders cannot read (the others can)."""
    warnings = []
    for s in checkpoint_settings(spec.quant):
        unable = {loader.name: why_unreadable(loader, s) for loader in LOADERS}
        blocked = [f"{name} (needs {', '.join(why)})" for name, why in unable.items() if why]
        readers = [name for name, why in unable.items() if not why]
        if blocked and readers:
            warnings.append(f"{_described(s)}: readable by {', '.join(readers)} but not by {'; '.join(blocked)}")
    return warnings


def _readable_group_sizes(s: CheckpointSettings) -> set[int]:
    """The group sizes some loader reads with s's other settings unchanged."""
    sizes: set[int] = set()
    for loader in LOADERS:
        sizes |= {g for g in loader.group_sizes if not why_unreadable(loader, replace(s, group_size=g))}
    return sizes


def _described(s: CheckpointSettings) -> str:
    return f"bits={s.bits}, group_size={s.group_size}, sym={s.sym}, desc_act={s.desc_act} ({s.where})"


def _listed(values: frozenset[int]) -> str:
    return "in {" + ", ".join(str(v) for v in sorted(values)) + "}"

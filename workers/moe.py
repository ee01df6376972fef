"""Mixture-of-experts blocks as plain per-expert linears, named as the checkpoint names them.

transformers 5 keeps the routed experts of Mixtral, Qwen2/3-MoE and DeepSeek-V2/V3 as one module
holding fused 3-D parameters (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]),
while the checkpoints on the Hub, GPTQModel and vLLM name one linear per expert
(`block_sparse_moe.experts.{e}.w1` for Mixtral, `mlp.experts.{e}.gate_proj` for the others).
`unfuse_experts` replaces each fused module of the skeleton by `RoutedExperts`, an `nn.ModuleList`
of per-expert linears with the same forward signature and result, and renames module paths so a
block's state-dict names are the checkpoint's names. Both facts come from transformers' own
checkpoint conversion (`revert_weight_conversion`, what `save_pretrained` writes), not from a table.

Then each expert is an input group of its own (find_input_groups), its Hessian has an owner like any
other group, and a 256-expert block spreads over the workers. With `quant.moe.hessian_tokens: routed`
each expert's Hessians come from the tokens its router sends it; with `all` (calibration mode) every
token runs through every expert for the Hessian hooks. Either way the block's output stays gated as the
model computes it; the routed token counts decide which experts are starved (`MoEConfig`).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rayquant.workers.adapter import InputGroup, UnsupportedArchitecture
from rayquant.workers.expert_padding import (PADDED_DEVICES, Dispatch, expert_linears, padded_forward,
                                             stack_expert_weights)

StarvedPolicy = Literal["error", "calibrate_all", "rtn"]
HessianTokens = Literal["all", "routed"]
ROLES = ("gate", "up", "down")  # gate_up_proj rows [0, I) are the gate, [I, 2I) the up projection


class StarvedExpert(Exception):
    """An expert was routed fewer calibration tokens than quant.moe.min_tokens, and the policy is error."""


@dataclass(frozen=True)
class MoEConfig:
    min_tokens: int = 1  # an expert routed fewer calibration tokens than this is starved
    starved_experts: StarvedPolicy = "calibrate_all"  # error: stop; calibrate_all: GPTQ on all tokens; rtn: RTN
    # routed: each expert's Hessians from the tokens routed to it (its real inputs; top-k/E of the expert
    # compute); all: every token through every expert (one shared gate/up Hessian, E× the expert compute)
    hessian_tokens: HessianTokens = "routed"


class _Expert(nn.Module):
    """One expert: gate, up and down linears under the checkpoint's names (w1/w3/w2 or *_proj)."""

    def __init__(self, names: tuple[str, str, str], hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.names = names
        shapes = ((hidden, intermediate), (hidden, intermediate), (intermediate, hidden))
        for name, (k, n) in zip(names, shapes):
            setattr(self, name, nn.Linear(k, n, bias=False, device="meta", dtype=dtype))


class RoutedExperts(nn.ModuleList):
    """Per-expert linears in place of a fused experts module; forward(hidden [T, H], top_k_index [T, k],
    top_k_weights [T, k]) -> [T, H], the sum over each token's experts as transformers computes it."""

    def __init__(self, experts: list[_Expert], act_fn: nn.Module):
        super().__init__(experts)
        object.__setattr__(self, "act_fn", act_fn)  # not a child: the list holds experts only
        self.calibrate_all = False  # run every token through every expert (for the Hessian hooks only)
        self.calibrate_experts: frozenset[int] = frozenset()  # the same for these experts only (starved)
        self.routed_tokens: torch.Tensor | None = None  # [E] int64, tokens routed per expert since reset
        # while a stage of these experts' groups collects, forward hands its dispatch to the stage's collector
        # (workers/expert_collect.py) and runs no expert itself: nothing reads the output of that forward
        self.collector = None
        # not None: forward returns this value everywhere at once (workers/unread_experts.py: a stage whose
        # input does not read the experts' output skips them; its probe replaces that output by ones)
        self.fill: float | None = None
        # while a routing memo is on (workers/routing_memo.py): id(top_k_index) -> (weak ref, its version, the
        # dispatch order `_dispatch_order` computed for it); None: computed every call
        self.dispatches: dict[int, tuple] | None = None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        if self.fill is not None:
            return torch.full_like(hidden_states, self.fill)
        out = torch.zeros_like(hidden_states)
        E, k = len(self), top_k_index.shape[-1]
        flat = top_k_index.reshape(-1)  # [T·k], (token, slot) pairs in row-major order
        tokens, by_expert, counts = self._dispatch_order(top_k_index, flat)
        self.routed_tokens = tokens if self.routed_tokens is None else self.routed_tokens + tokens
        token_of, slot_of = by_expert // k, by_expert % k
        batched = (hidden_states.device.type in PADDED_DEVICES and not self.calibrate_all
                   and not self.calibrate_experts and not self._hooked())
        if self.collector is not None or batched:
            starts = [0]
            for n in counts:
                starts.append(starts[-1] + n)
            every = frozenset(range(E)) if self.calibrate_all else self.calibrate_experts
            dispatch = Dispatch(hidden_states, token_of, flat[by_expert], starts, every)
            if self.collector is not None:
                self.collector.collect(dispatch)  # ends the forward
            padded_forward(self, dispatch, top_k_weights.reshape(-1)[by_expert], out)
            return out
        start = 0
        for e, (expert, n) in enumerate(zip(self, counts)):
            token_idx, top_k_pos = token_of[start:start + n], slot_of[start:start + n]
            start += n
            every_token = self.calibrate_all or e in self.calibrate_experts
            if every_token:
                # view_as: a tensor object of its own, so each expert is its own input group
                y = self._expert_forward(expert, hidden_states.view_as(hidden_states))[token_idx]
            elif n == 0:
                continue
            else:
                y = self._expert_forward(expert, hidden_states[token_idx])
            out.index_add_(0, token_idx, (y * top_k_weights[token_idx, top_k_pos, None]).to(out.dtype))
        return out

    def _dispatch_order(self, top_k_index: torch.Tensor, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      list[int]]:
        """(tokens per expert [E], the (token, slot) pairs sorted by expert, the same counts on the host); kept
        per index tensor while a routing memo is on (`dispatches`)."""
        if self.dispatches is not None:
            hit = self.dispatches.get(id(top_k_index))
            if hit is not None and hit[0]() is top_k_index and hit[1] == top_k_index._version:
                return hit[2]
        E = len(self)
        # index E marks a dropped slot in some routers; it counts for no expert
        tokens = torch.bincount(flat, minlength=E + 1)[:E]
        # one dispatch for all experts: a stable sort keeps each expert's pairs in ascending token order (as
        # torch.where(top_k_index == e) gives them) and the counts cross to the host once, not once per expert
        order = (tokens, torch.argsort(flat, stable=True), tokens.tolist())
        if self.dispatches is not None:
            key, kept = id(top_k_index), self.dispatches
            kept[key] = (weakref.ref(top_k_index, lambda _r: kept.pop(key, None)), top_k_index._version, order)
        return order

    def _hooked(self) -> bool:
        """Whether a hook watches an expert's linear (input-group probes): those see one call per expert."""
        return any(m._forward_pre_hooks or m._forward_hooks for expert in self for m in expert.children())

    def _expert_forward(self, expert: _Expert, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(expert, name) for name in expert.names)
        return down(self.act_fn(gate(x)) * up(x))


def _is_fused_experts(module: nn.Module) -> bool:
    params = dict(module.named_parameters(recurse=False))
    return any(p.dim() == 3 for p in params.values())


def unfuse_experts(model: nn.Module) -> int:
    """Replace every fused experts module by RoutedExperts and align module paths with checkpoint names.

    Works on the meta skeleton, before any block is materialised. Returns the number replaced.

    Raises:
        UnsupportedArchitecture: fused expert parameters other than gate_up_proj/down_proj, or
            checkpoint names that are not one linear per expert (the checkpoint stores them fused).
    """
    fused = [(name, mod) for name, mod in model.named_modules() if _is_fused_experts(mod)]
    if not fused:
        return 0
    for name, mod in fused:
        params = {n: tuple(p.shape) for n, p in mod.named_parameters(recurse=False)}
        if set(params) != {"gate_up_proj", "down_proj"} or not hasattr(mod, "act_fn"):
            raise UnsupportedArchitecture(
                f"{name} ({type(mod).__name__}) holds fused expert parameters {params}; rayquant quantizes "
                "experts stored as gate_up_proj [E, 2I, H] + down_proj [E, H, I] (Mixtral, Qwen-MoE, DeepSeek "
                "layouts); this one is not supported: choose another model.source")
    checkpoint_names = _checkpoint_names(model, fused)
    for name, mod in fused:
        E, two_i, hidden = mod.gate_up_proj.shape
        leaves = tuple(checkpoint_names[(name, 0, role)].rsplit(".", 2)[1] for role in ROLES)
        experts = [_Expert(leaves, hidden, two_i // 2, mod.gate_up_proj.dtype) for _ in range(E)]
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent), attr, RoutedExperts(experts, mod.act_fn))
    renames: dict[str, str] = {}
    for key, checkpoint_name in checkpoint_names.items():
        module_name = (f"{key[0]}.{key[1]}.{checkpoint_name.rsplit('.', 2)[1]}.weight" if isinstance(key, tuple)
                       else key)
        _collect_path_renames(module_name, checkpoint_name, renames)
    for path, new in sorted(renames.items(), key=lambda kv: -kv[0].count(".")):  # deepest first
        _rename_module(model, path, new)
    return len(fused)


def _checkpoint_names(model: nn.Module, fused: list[tuple[str, nn.Module]]) -> dict:
    """Checkpoint name of every parameter under a fused module's parent, from transformers' save conversion.

    Keys: a state-dict name, or (experts module path, expert, role) for the fused parameters. Each
    source is a marker tensor of distinct integers (exact in float32), so each name the conversion
    writes says by its value which parameter, expert and role it came from.
    """
    from transformers.core_model_loading import revert_weight_conversion  # seconds to import: MoE models only

    scopes = tuple(name.rpartition(".")[0] + "." for name, _ in fused)
    plain = [n for n in model.state_dict() if n.startswith(scopes) and not n.startswith(tuple(
        name + "." for name, _ in fused))]
    markers: dict[str, torch.Tensor] = {}
    origin: dict[int, object] = {}
    for name in plain:
        origin[len(origin)] = name
        markers[name] = torch.tensor([float(len(origin) - 1)])
    for name, mod in fused:
        E = mod.gate_up_proj.shape[0]
        base = len(origin)
        for e in range(E):
            for j, role in enumerate(ROLES):
                origin[base + 3 * e + j] = (name, e, role)
        values = torch.arange(base, base + 3 * E, dtype=torch.float32).reshape(E, 3)
        markers[f"{name}.gate_up_proj"] = values[:, :2].reshape(E, 2, 1).contiguous()
        markers[f"{name}.down_proj"] = values[:, 2].reshape(E, 1, 1).contiguous()
    if len(origin) >= 2**24:
        raise UnsupportedArchitecture(f"{len(origin)} parameters in MoE blocks: too many to trace by marker")
    out: dict = {}
    for checkpoint_name, tensor in revert_weight_conversion(model, markers).items():
        if tensor.numel() != 1:
            raise UnsupportedArchitecture(
                f"the checkpoint format of {type(model).__name__} stores {checkpoint_name} with "
                f"{tensor.numel()} parts of the fused experts; rayquant writes one linear per expert only")
        out[origin[int(tensor.item())]] = checkpoint_name
    missing = [k for k in origin.values() if k not in out]
    if missing:
        raise UnsupportedArchitecture(f"transformers' checkpoint conversion dropped {missing[:3]}; cannot name them")
    for (path, e, role), checkpoint_name in ((k, v) for k, v in out.items() if isinstance(k, tuple)):
        if checkpoint_name.rsplit(".", 3)[1] != str(e) or not checkpoint_name.endswith(".weight"):
            raise UnsupportedArchitecture(
                f"{path} expert {e} {role} is saved as {checkpoint_name}, not as <experts>.{e}.<linear>.weight")
    return out


def _collect_path_renames(module_name: str, checkpoint_name: str, renames: dict[str, str]) -> None:
    """Module path → new last component wherever the names differ (e.g. layers.0.mlp → block_sparse_moe)."""
    if module_name == checkpoint_name:
        return
    a, b = module_name.split("."), checkpoint_name.split(".")
    if len(a) != len(b) or a[-1] != b[-1]:
        raise UnsupportedArchitecture(
            f"checkpoint name {checkpoint_name} is not a renamed path of module {module_name}; "
            "this MoE layout is not supported")
    for i, (x, y) in enumerate(zip(a[:-1], b[:-1])):
        if x != y:
            path = ".".join(a[: i + 1])
            if renames.setdefault(path, y) != y:
                raise UnsupportedArchitecture(f"module {path} has two checkpoint names: {renames[path]}, {y}")


def _rename_module(model: nn.Module, path: str, new: str) -> None:
    """Register the child at `path` under `new` (state-dict names), keep `old` as a plain attribute for forward."""
    parent_path, _, old = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    child = parent._modules[old]
    parent._modules = OrderedDict((new if k == old else k, v) for k, v in parent._modules.items())
    parent.__dict__[old] = child  # forward still reads self.<old>; one object under both names


def routed_experts(block: nn.Module) -> list[RoutedExperts]:
    return [m for m in block.modules() if isinstance(m, RoutedExperts)]


def stack_experts(block: nn.Module, source: dict[str, torch.Tensor], prefix: str) -> None:
    """On PADDED_DEVICES, every RoutedExperts of the block keeps its experts' weights stacked, one tensor per role
    (expert_padding.stack_expert_weights); the block's `source` entries (full names under `prefix`) that were
    the replaced tensors become the rows, so the weights stay held once."""
    names = {id(m): n for n, m in block.named_modules()}

    def repoint(linear: nn.Linear, old: torch.Tensor) -> None:
        name = f"{prefix}{names[id(linear)]}.weight"
        if name in source and source[name].data_ptr() == old.data_ptr():
            source[name] = linear.weight.detach()

    for module in routed_experts(block):
        if expert_linears(module, 0)[0].weight.device.type in PADDED_DEVICES:
            stack_expert_weights(module, repoint)


def set_calibration(block: nn.Module, on: bool) -> None:
    """Calibration mode: every token through every expert for the hooks; outputs stay gated."""
    for m in routed_experts(block):
        m.calibrate_all = on


def calibrate_experts(block: nn.Module, groups: list[InputGroup]) -> None:
    """Every token through the experts of `groups` only (starved experts under hessian_tokens=routed), none
    through the others beyond their routed tokens; [] ends it. Outputs stay gated."""
    chosen: dict[str, set[int]] = {}
    for g in groups:
        where = expert_of(block, g)
        chosen.setdefault(where.experts_path, set()).add(where.index)
    for path, m in block.named_modules():
        if isinstance(m, RoutedExperts):
            m.calibrate_experts = frozenset(chosen.get(path, ()))


def reset_routed_tokens(block: nn.Module) -> None:
    for m in routed_experts(block):
        m.routed_tokens = None


@dataclass(frozen=True)
class ExpertGroup:
    """Where an input group sits inside a RoutedExperts module."""

    experts_path: str  # the RoutedExperts module, relative to the block
    index: int  # the expert
    role: str  # its projection: one of ROLES


def expert_of(block: nn.Module, group: InputGroup) -> ExpertGroup | None:
    """The expert an input group belongs to, or None outside RoutedExperts."""
    path, _, leaf = group.linears[0].rpartition(".")
    experts_path, _, index = path.rpartition(".")
    if not index.isdigit() or not experts_path or not isinstance(block.get_submodule(experts_path), RoutedExperts):
        return None
    expert = block.get_submodule(path)
    return ExpertGroup(experts_path, int(index), ROLES[expert.names.index(leaf)])


def local_routed_tokens(block: nn.Module, group: InputGroup) -> int:
    """Tokens this rank's shard routed to the group's expert since the last reset (0 if none ran)."""
    where = expert_of(block, group)
    counts = block.get_submodule(where.experts_path).routed_tokens
    return 0 if counts is None else int(counts[where.index].item())


def shared_hessians(block: nn.Module, stage: list[InputGroup]) -> dict[str, str]:
    """Expert gate/up groups of the stage whose Hessian is another group's: in calibration mode every
    expert reads all tokens, so all gate/up inputs of one RoutedExperts are the same matrix and one
    Hessian (expert 0's) serves every expert — 1/E of the accumulation and memory. {group: source}."""
    first: dict[str, str] = {}
    aliases: dict[str, str] = {}
    for g in stage:
        where = expert_of(block, g)
        if where is None or where.role == "down" or not block.get_submodule(where.experts_path).calibrate_all:
            continue
        if where.experts_path in first:
            aliases[g.name] = first[where.experts_path]
        else:
            first[where.experts_path] = g.name
    return aliases


def sequential_stages(block: nn.Module, groups: list[InputGroup], hessian_tokens: str = "routed",
                      hessian_bytes: int = 4) -> list[list[InputGroup]]:
    """true_sequential sub-stages: one per input group, except that the same projection of every expert
    of one RoutedExperts forms a single stage (the experts never read each other's outputs), cut into
    stages of consecutive experts whose Hessian sums stay under EXPERT_STAGE_HESSIAN_BYTES
    (`hessian_bytes` per element; under `all` the gate/up stage sums one shared Hessian)."""
    stages: list[list[InputGroup]] = []
    by_key: dict[tuple[str, str], list[InputGroup]] = {}
    for g in groups:
        where = expert_of(block, g)
        if where is None:
            stages.append([g])
            continue
        key = (where.experts_path, "down" if where.role == "down" else "gate_up")
        if key not in by_key:
            by_key[key] = []
            stages.append(by_key[key])
        by_key[key].append(g)
    cut: list[list[InputGroup]] = []
    for stage in stages:
        where = expert_of(block, stage[0])
        if where is None or (hessian_tokens == "all" and where.role != "down"):
            cut.append(stage)
            continue
        size = 0
        for i, g in enumerate(stage):
            nbytes = g.in_features ** 2 * hessian_bytes
            if i == 0 or size + nbytes > EXPERT_STAGE_HESSIAN_BYTES:
                cut.append([])
                size = 0
            cut[-1].append(g)
            size += nbytes
    return cut


# Hessian sums one expert stage collects at once: under `routed` every expert's gate/up Hessian is its own
# (DeepSeek-V3: 256 × 7168² fp32 = 52 GB), so its experts are collected and solved in several stages
EXPERT_STAGE_HESSIAN_BYTES = 4 << 30


def expert_stage(block: nn.Module, stage: list[InputGroup]) -> tuple[RoutedExperts, list[int], str] | None:
    """(the RoutedExperts, its experts in stage order, "gate_up" | "down") when every group of `stage` is one
    projection of experts of one RoutedExperts (workers/expert_collect.py collects those at once); else None."""
    where = [expert_of(block, g) for g in stage]
    if not where or None in where or len({w.experts_path for w in where}) != 1:
        return None
    roles = {"down" if w.role == "down" else "gate_up" for w in where}
    if len(roles) != 1:
        return None
    return block.get_submodule(where[0].experts_path), [w.index for w in where], roles.pop()

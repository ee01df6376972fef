"""Any transformers decoder model as embed → blocks → head, with no per-model code.

The skeleton is built from config.json with parameters on the meta device (buffers such as rotary
frequencies stay real), so a 405B model costs nothing until a block is materialised. The inputs
of block 0 and every block's kwargs (masks, rotary embeddings: they may differ per layer type) are
captured by running the model's own forward with each block replaced by a pass-through recorder;
which linears share an input, and the order of true_sequential sub-stages, come from a forward pass
through the block itself.
"""

from __future__ import annotations

import copy
import inspect
import weakref
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES


class UnsupportedArchitecture(Exception):
    """The model is not a decoder-only causal LM that rayquant can split into blocks."""


@dataclass(frozen=True)
class BlockInput:
    """One micro-batch at the input of block `block_idx`: hidden states [B, T, hidden] and the kwargs
    the model's own forward gives each block (masks, rotary embeddings)."""

    hidden: torch.Tensor
    # block b's kwargs; models with `layer_types` give sliding and full layers their own mask and
    # (Gemma 3) their own rotary embeddings. Blocks of one type share the same tensor objects, so L
    # dicts cost little more than one.
    block_kwargs: tuple[dict[str, Any], ...]
    block_idx: int = 0

    @property
    def kwargs(self) -> dict[str, Any]:
        return self.block_kwargs[self.block_idx]

    def advanced(self, hidden: torch.Tensor) -> BlockInput:
        """The next block's input: its output `hidden` with the next block's kwargs."""
        return BlockInput(hidden, self.block_kwargs, min(self.block_idx + 1, len(self.block_kwargs) - 1))


# MoE routers and gates stay in full precision: a rounded router picks other experts. In transformers 5
# routers are parameters of a router module, but Qwen2-MoE's shared_expert_gate ([1, H]) is a linear.
ROUTER_NAMES = frozenset({"gate", "router", "shared_expert_gate"})


@dataclass(frozen=True)
class InputGroup:
    """Linears of one block that read the same input tensor, so they share one Hessian."""

    name: str  # e.g. "self_attn.q_proj+k_proj+v_proj"
    linears: tuple[str, ...]  # names relative to the block, in forward order
    in_features: int


@dataclass(frozen=True)
class DecoderLayout:
    blocks_path: str  # e.g. "model.layers"
    n_blocks: int
    head_names: tuple[str, ...]  # parameters of the output head (never needed by workers)

    def block_prefix(self, block_idx: int) -> str:
        return f"{self.blocks_path}.{block_idx}."


def check_decoder_architecture(config: dict) -> None:
    """Reject models that are not decoder-only causal LMs, before any worker starts.

    Raises:
        UnsupportedArchitecture: encoder-only / encoder-decoder models, unknown model types.
    """
    model_type = config.get("model_type")
    archs = config.get("architectures") or []
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedArchitecture(
            f"model_type {model_type!r} is unknown to this transformers version; "
            "upgrade transformers or choose another model.source"
        )
    causal_names = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    if config.get("is_encoder_decoder") or not any(a in causal_names for a in archs):
        raise UnsupportedArchitecture(
            f"model.source is a {model_type} model with architectures {archs}: rayquant quantizes "
            "decoder-only causal LMs (…ForCausalLM); choose a causal LM checkpoint"
        )


def build_skeleton(config: dict, dtype: torch.dtype) -> nn.Module:
    """The whole model with meta parameters and real buffers (rotary frequencies)."""
    check_decoder_architecture(config)
    cfg = CONFIG_MAPPING[config["model_type"]].from_dict(dict(config))
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval()


def find_layout(model: nn.Module) -> DecoderLayout:
    """Locate the decoder blocks: the ModuleList holding num_hidden_layers blocks.

    Raises:
        UnsupportedArchitecture: no such list exists.
    """
    n_layers = getattr(model.config, "num_hidden_layers", None)
    candidates = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and len(mod) > 0 and (n_layers is None or len(mod) == n_layers)
    ]
    if not candidates:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} has no list of {n_layers} decoder blocks; "
            "this architecture is not supported"
        )
    blocks_path = min(candidates, key=lambda c: c[0].count("."))[0]
    head = model.get_output_embeddings()
    head_names = tuple(
        f"{name}.{p}" for name, mod in model.named_modules() if mod is head for p, _ in mod.named_parameters()
    )
    return DecoderLayout(blocks_path=blocks_path, n_blocks=len(model.get_submodule(blocks_path)), head_names=head_names)


def materialize(module: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> nn.Module:
    """A real copy of a meta module with the given tensors (names relative to it), floats in `dtype`."""
    real = copy.deepcopy(module)
    real.load_state_dict(_cast_floats(tensors, dtype), strict=True, assign=True)
    return real


def materialize_embedding_stage(model: nn.Module, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Load every non-block, non-head parameter into the skeleton in place (embeddings, final norm)."""
    model.load_state_dict(_cast_floats(tensors, dtype), strict=False, assign=True)


def _cast_floats(tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in tensors.items()}


def move_buffers(model: nn.Module, device: torch.device) -> None:
    """Move the real buffers (rotary frequencies) to `device`; meta parameters stay where they are."""
    for mod in model.modules():
        for name, buf in mod._buffers.items():
            if buf is not None and not buf.is_meta:
                mod._buffers[name] = buf.to(device)


def embedding_stage_names(model: nn.Module, layout: DecoderLayout) -> list[str]:
    """State-dict names that block 0's inputs depend on: all but the blocks and the output head."""
    prefix = layout.blocks_path + "."
    head = set(layout.head_names)
    return [n for n in model.state_dict() if not n.startswith(prefix) and n not in head]


class _PassedLastBlock(Exception):
    """Raised by the last block's catcher: the head's work is not needed."""


class _StandIn(nn.Module):
    """Takes a block's place in the model's own forward; other attributes read through to the real
    block (some models read e.g. `attention_type` from their layers)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


class _Catcher(_StandIn):
    """Stands in for one block during capture: records the call, returns the hidden states unchanged.

    The kwargs a model hands its blocks (masks, rotary embeddings) depend on the positions and the
    block's layer type, never on the hidden states, so passing them through unchanged is enough.
    """

    def __init__(self, inner: nn.Module, calls: list[tuple[tuple, dict]], last: bool):
        super().__init__(inner)
        self.calls = calls
        self.last = last

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls.append((args, kwargs))
        if self.last:
            raise _PassedLastBlock
        return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: DecoderLayout, input_ids: torch.Tensor) -> BlockInput:
    """Run the model's own forward on [B, T] ids through pass-through blocks; record every block's call.

    Raises:
        UnsupportedArchitecture: the forward skips blocks, passes extra positional arguments, or leaves
            a required argument of the block's forward unset.
    """
    blocks = model.get_submodule(layout.blocks_path)
    real = list(blocks)
    calls: list[tuple[tuple, dict]] = []
    for i, block in enumerate(real):
        blocks[i] = _Catcher(block, calls, last=i == len(real) - 1)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _PassedLastBlock:
        pass
    finally:
        for i, block in enumerate(real):
            blocks[i] = block
    name = type(model).__name__
    if len(calls) != len(real):
        raise UnsupportedArchitecture(
            f"{name}.forward called {len(calls)} of its {len(real)} blocks at {layout.blocks_path}; "
            "rayquant needs a model that runs every block once, in order; this architecture is not supported"
        )
    args, first = calls[0]
    hidden = args[0] if args else first["hidden_states"]
    block_kwargs = []
    for args, kwargs in calls:
        if len(args) > 1:
            raise UnsupportedArchitecture(
                f"{name} passes {len(args) - 1} extra positional arguments to its blocks; "
                "this architecture is not supported"
            )
        block_kwargs.append({k: v for k, v in kwargs.items() if k != "hidden_states"})
    _check_block_arguments(real[0], block_kwargs[0], name)
    return BlockInput(hidden=hidden, block_kwargs=tuple(block_kwargs))


def _check_block_arguments(block: nn.Module, kwargs: dict[str, Any], model_name: str) -> None:
    """Every required parameter of the block's forward after the hidden states must be supplied."""
    params = list(inspect.signature(block.forward).parameters.values())[1:]
    missing = [
        p.name for p in params
        if p.default is inspect.Parameter.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        and p.name not in kwargs
    ]
    if missing:
        raise UnsupportedArchitecture(
            f"{type(block).__name__}.forward requires {missing}, which {model_name}.forward does not pass "
            "to its blocks; rayquant can only replay what the model's own forward supplies; "
            "this architecture is not supported"
        )


def forward_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """The block's output hidden states (blocks return a tensor or a tuple led by it)."""
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def quantizable_linears(block: nn.Module) -> list[str]:
    """The block's linears GPTQ quantizes (names relative to the block): every linear but a router."""
    return [name for name, mod in block.named_modules()
            if isinstance(mod, nn.Linear) and name.rpartition(".")[2] not in ROUTER_NAMES]


def find_input_groups(block: nn.Module, inp: BlockInput) -> list[InputGroup]:
    """Group the block's linears by the identity of the tensor they read, in forward order.

    Inputs are held by weak reference: a strong one would keep every linear's input alive to the end of
    the forward (an MoE block's experts: 256 down-projection inputs of a whole micro-batch each, ~32 GB
    at DeepSeek-V3's size). A tensor that has died can no longer be read by a later linear, and a new
    tensor never matches a dead reference, so the groups are the same."""
    seen: list[tuple[weakref.ref, list[str], int]] = []
    hooks = []

    def hook(name: str):
        def record(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            for ref, names, _ in seen:
                if ref() is x:
                    if name not in names:
                        names.append(name)
                    return
            seen.append((weakref.ref(x), [name], x.shape[-1]))
        return record

    for name in quantizable_linears(block):
        hooks.append(block.get_submodule(name).register_forward_pre_hook(hook(name)))
    try:
        forward_block(block, inp)
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for _, names, in_features in seen:
        stem = names[0].rsplit(".", 1)
        label = names[0] if len(names) == 1 else stem[0] + "." + "+".join(n.rsplit(".", 1)[-1] for n in names)
        groups.append(InputGroup(name=label, linears=tuple(names), in_features=in_features))
    return groups


class _Replay(_StandIn):
    """Stands in for a block when only the head is wanted: the first returns the given final hidden
    states, the others pass them through."""

    def __init__(self, inner: nn.Module, hidden: torch.Tensor | None):
        super().__init__(inner)
        self.hidden = hidden

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.hidden is not None:
            return self.hidden
        return args[0] if args else kwargs["hidden_states"]


@torch.no_grad()
def final_logits(model: nn.Module, layout: DecoderLayout, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Logits [B, T, vocab] for the last block's output `hidden`, through the model's own forward.

    Whatever a model does after its blocks (final norm, soft-capping, a projection) runs as in
    transformers, with no per-model code: the blocks are replaced by stand-ins that emit `hidden`.
    The embedding stage and the head must be materialised.
    """
    blocks = model.get_submodule(layout.blocks_path)
    real = list(blocks)
    for i, block in enumerate(real):
        blocks[i] = _Replay(block, hidden if i == 0 else None)
    try:
        return model(input_ids=input_ids, use_cache=False).logits
    finally:
        for i, block in enumerate(real):
            blocks[i] = block


def tie_output_head(model: nn.Module) -> None:
    """Give a head the checkpoint stores no weight for (tied embeddings) the input embedding's."""
    head = model.get_output_embeddings()
    if head is not None and head.weight.is_meta:
        head.weight = model.get_input_embeddings().weight


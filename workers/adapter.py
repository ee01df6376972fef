"""Any transformers decoder model as embed → blocks → head, with no per-model code.

The skeleton is built from config.json with parameters on the meta device (buffers such as rotary
frequencies stay real), so a 405B model costs nothing until a block is materialised. The inputs
of block 0 and the block kwargs (masks, rotary embeddings) are captured by running the model's own
forward until it reaches the first block; which linears share an input, and the order of
true_sequential sub-stages, come from a forward pass through the block itself.
"""

from __future__ import annotations

import copy
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
    """One micro-batch at a block boundary: hidden states [B, T, hidden] and the block kwargs."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


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


class _ReachedFirstBlock(Exception):
    def __init__(self, args: tuple, kwargs: dict):
        super().__init__("reached block 0")
        self.args_, self.kwargs_ = args, kwargs


class _Catcher(nn.Module):
    """Stands in for block 0 and stops the forward there; other attributes read through to it."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)

    def forward(self, *args: Any, **kwargs: Any) -> None:
        raise _ReachedFirstBlock(args, kwargs)


@torch.no_grad()
def capture_block_inputs(model: nn.Module, layout: DecoderLayout, input_ids: torch.Tensor) -> BlockInput:
    """Run the model's own forward on [B, T] ids up to block 0; return its hidden states and kwargs."""
    blocks = model.get_submodule(layout.blocks_path)
    first = blocks[0]
    blocks[0] = _Catcher(first)
    try:
        model(input_ids=input_ids, use_cache=False)
    except _ReachedFirstBlock as caught:
        args, kwargs = caught.args_, dict(caught.kwargs_)
    else:
        raise UnsupportedArchitecture(f"{type(model).__name__}.forward never called block 0")
    finally:
        blocks[0] = first
    hidden = args[0] if args else kwargs.pop("hidden_states")
    if len(args) > 1:
        raise UnsupportedArchitecture(
            f"{type(model).__name__} passes {len(args) - 1} extra positional arguments to its blocks; "
            "this architecture is not supported"
        )
    return BlockInput(hidden=hidden, kwargs=kwargs)


def forward_block(block: nn.Module, inp: BlockInput) -> torch.Tensor:
    """The block's output hidden states (blocks return a tensor or a tuple led by it)."""
    out = block(inp.hidden, **inp.kwargs)
    return out[0] if isinstance(out, tuple) else out


@torch.no_grad()
def find_input_groups(block: nn.Module, inp: BlockInput) -> list[InputGroup]:
    """Group the block's linears by the identity of the tensor they read, in forward order."""
    seen: list[tuple[torch.Tensor, list[str]]] = []
    hooks = []

    def hook(name: str):
        def record(_mod: nn.Module, args: tuple) -> None:
            x = args[0]
            for tensor, names in seen:
                if tensor is x:
                    if name not in names:
                        names.append(name)
                    return
            seen.append((x, [name]))
        return record

    for name, mod in block.named_modules():
        if isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_pre_hook(hook(name)))
    try:
        forward_block(block, inp)
    finally:
        for h in hooks:
            h.remove()
    groups = []
    for x, names in seen:
        stem = names[0].rsplit(".", 1)
        label = names[0] if len(names) == 1 else stem[0] + "." + "+".join(n.rsplit(".", 1)[-1] for n in names)
        groups.append(InputGroup(name=label, linears=tuple(names), in_features=x.shape[-1]))
    return groups

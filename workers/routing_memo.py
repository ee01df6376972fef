"""An MoE block's routing computed once per calibration micro-batch while its stages collect.

Every expert stage of an MoE block (and DeepSeek's shared expert's) runs the MoE child again on the same
recorded input (workers/stage_inputs.py): at DeepSeek-V3 ~15 passes of 16 micro-batches, each computing the
router (an fp32 product over 7168 × 256 and a grouped top-k) and dispatching its choice (a stable sort, a
bincount, and the counts read back by the host: a device sync per micro-batch, so the host cannot queue
work ahead of the GPU). Routers are never quantized and read nothing but their input, so a router called on
the same tensor returns the same output: `routing_memo` keeps each router's output per input (the same base
tensor, view and version), and `RoutedExperts` keeps the dispatch order of each top-k index tensor it is
given (`moe.RoutedExperts.dispatches`). An input or output modified in place since (its version counter) is
computed again; an entry goes when its input does (weak references), so the memo holds no activation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from rayquant.workers.adapter import ROUTER_NAMES
from rayquant.workers.moe import routed_experts


@contextlib.contextmanager
def routing_memo(block: nn.Module) -> Iterator[None]:
    """While the body runs, the block's routers return their kept output for an input they saw, and its
    RoutedExperts reuse the dispatch of an index tensor they saw. No-op in blocks without routed experts."""
    experts = routed_experts(block)
    if not experts:
        yield
        return
    routers = [m for name, m in block.named_modules() if name.rpartition(".")[2] in ROUTER_NAMES]
    memos = [_MemoForward(m.forward) for m in routers]
    for m, memo in zip(routers, memos):
        m.forward = memo  # an instance attribute: nn.Module.__call__ finds it before the class's
    for m in experts:
        m.dispatches = {}
    try:
        yield
    finally:
        for m, memo in zip(routers, memos):
            del m.forward
            memo.kept.clear()
        for m in experts:
            m.dispatches = None


class _MemoForward:
    """A router's forward with its outputs kept per input tensor."""

    def __init__(self, forward):
        self.forward = forward
        self.kept: dict[tuple, tuple[weakref.ref, int, Any, tuple[int, ...]]] = {}

    def __call__(self, *args, **kwargs):
        if kwargs or len(args) != 1 or not isinstance(args[0], torch.Tensor):
            return self.forward(*args, **kwargs)
        x = args[0]
        base = x if x._base is None else x._base
        key = (id(base), x.shape, x.stride(), x.storage_offset(), x.dtype)
        hit = self.kept.get(key)
        if hit is not None:
            ref, version, out, versions = hit
            if ref() is base and version == x._version and versions == _versions(out):
                return out
        out = self.forward(x)
        # the entry dies with the input's base (its memory cannot be reused while the entry holds an address)
        self.kept[key] = (weakref.ref(base, lambda _r, key=key: self.kept.pop(key, None)), x._version, out,
                          _versions(out))
        return out


def _versions(out: Any) -> tuple[int, ...]:
    tensors = out if isinstance(out, (tuple, list)) else (out,)
    return tuple(t._version for t in tensors if isinstance(t, torch.Tensor))

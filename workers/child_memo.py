"""A block child's output from its last linear's kept input, so later forwards skip the child's other GEMMs.

When the linears of a once-called direct child C of the block (Llama: `self_attn`, `mlp`) are quantized
in two or more true_sequential stages and the last of them is one linear Lc (`o_proj`, `down_proj`), the
collect of Lc's stage sees Lc's input for every micro-batch, computed by C's other linears, all quantized
by then. Every later forward of C on that micro-batch (the block forwards of later stages, and the advance
through the quantized block) would compute that input again: at 405B the advance's q/k/v and gate/up
GEMMs are two thirds of its products. The memo keeps Lc's input per micro-batch and such forwards run C
with its other linears returning zeros (no product) and Lc applied to the kept input: C's own code still
makes C's output, so the result is the same tensor bit for bit.

Checked, never assumed: the first micro-batch of every pass runs C both ways and compares them bitwise. A
child whose output reads its other linears other than through Lc's input, or whose input has changed since
the keep, fails that comparison and loses its memo for the block (logged); the pass runs C in full.

Where the memo lives: the device's memory on CPU (a reference, no copy); on CUDA either the GPU (where the
block's peak leaves room) or pinned host memory, copied out on a side stream as Lc's stage collects and back
a few micro-batches ahead of their use (at 405B Lc's inputs are 36 GB: the GPU has no room for them beside
the down projection's solve).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import structlog
import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from rayquant.workers.adapter import InputGroup, quantizable_linears
from rayquant.workers.moe import routed_experts
from rayquant.workers.stage_inputs import stage_holder

log = structlog.get_logger()

PREFETCH_MICRO_BATCHES = 4  # host placement: kept inputs copied back to the GPU ahead of the one in use


@dataclass
class _Child:
    """One memoized child: its last linear and the inputs kept for it."""

    name: str
    last: str  # Lc, relative to the block
    others: tuple[str, ...]  # the child's other linears, relative to the block
    stage: int  # Lc's stage: its collect keeps the inputs
    kept: dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> Lc's input (device or host)
    copied: dict[int, torch.cuda.Event] = field(default_factory=dict)  # host: the copy out is done
    fetched: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = field(default_factory=dict)  # host: copies back
    broken: bool = False
    shortcuts: int = 0  # forwards that ran from the kept input, this block
    checked: bool = False  # this pass compared both ways


class ChildMemo:
    """One block's memoized children. `keep_hooks(i)` during stage i's collect; `run(n)` around a pass over the
    n micro-batches (a stage's collect or the advance) with `micro_batch(k)` around each forward."""

    def __init__(self, block: nn.Module, stages: list[list[InputGroup]], once_called: frozenset[str],
                 device: torch.device, enabled: bool = True, signature: tuple = ()):
        self.block, self.device = block, device
        self.on_host = False  # pinned host memory (a GPU's memo, `place`); else the device's
        self.signature = signature  # the block's structure (the worker's placement choice is per structure)
        self.children = _memo_children(block, stages, once_called) if enabled else []
        self.index: int | None = None  # the micro-batch being forwarded inside a pass
        self.n_micro_batches = 0
        self.stream: torch.cuda.Stream | None = None  # host placement: the copies out and back

    def place(self, where: str | None) -> None:
        """Before the first keep: "device", "host" (CUDA only) or None (no memo), as `memo_placement` says."""
        if where is None:
            self.children = []
        self.on_host = where == "host" and self.device.type == "cuda" and bool(self.children)
        if self.on_host:
            self.stream = torch.cuda.Stream(self.device)

    def planned_bytes(self, inputs: list) -> int:
        """What the memo will keep for these micro-batches (BlockInputs): every token's input of every Lc."""
        if not self.children:
            return 0
        tokens = sum(inp.hidden.shape[:-1].numel() for inp in inputs)
        itemsize = inputs[0].hidden.element_size() if inputs else 0
        return sum(tokens * self.block.get_submodule(c.last).in_features * itemsize for c in self.children)

    @property
    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for c in self.children for x in c.kept.values())

    def used(self) -> dict[str, str]:
        """Child -> its last linear, for the children whose memo this block kept and checked."""
        return {c.name: c.last for c in self.children if c.kept and not c.broken}

    def shortcuts(self) -> dict[str, int]:
        return {c.name: c.shortcuts for c in self.children}

    def dropped(self) -> list[str]:
        return [c.name for c in self.children if c.broken]

    def keep_hooks(self, stage_idx: int) -> list[RemovableHandle]:
        """Pre-hooks keeping Lc's input per micro-batch, for the children whose last stage this is; prepended
        so they see the input before a Hessian hook ends the forward."""
        hooks = []
        for child in self.children:
            if child.stage == stage_idx and not child.broken:
                child.kept.clear()
                child.copied.clear()

                def keep(_mod: nn.Module, args: tuple, child: _Child = child) -> None:
                    if self.index is not None:
                        self._keep(child, self.index, args[0])
                hooks.append(self.block.get_submodule(child.last).register_forward_pre_hook(keep, prepend=True))
        return hooks

    @contextlib.contextmanager
    def run(self, n_micro_batches: int) -> Iterator[None]:
        """A pass over the micro-batches: every complete child's forward goes through the memo."""
        self.n_micro_batches = n_micro_batches
        ready = [c for c in self.children if not c.broken and len(c.kept) == n_micro_batches]
        saved = {}
        for child in ready:
            child.checked = False
            module = self.block.get_submodule(child.name)
            saved[child.name] = module.__dict__.get("forward")
            module.forward = self._memo_forward(child, module.forward)
        try:
            yield
        finally:
            self.index = None
            for child in ready:
                module = self.block.get_submodule(child.name)
                del module.forward
                if saved[child.name] is not None:
                    module.forward = saved[child.name]
                child.fetched.clear()

    @contextlib.contextmanager
    def micro_batch(self, index: int) -> Iterator[None]:
        self.index = index
        try:
            yield
        finally:
            self.index = None

    def release(self) -> None:
        """Drop every kept input (the advance is done)."""
        for child in self.children:
            child.kept.clear()
            child.copied.clear()
            child.fetched.clear()

    # ---- inside the forward ----------------------------------------------------------------------

    def _keep(self, child: _Child, index: int, x: torch.Tensor) -> None:
        if not self.on_host:
            child.kept[index] = x  # the forward never writes into a tensor it has passed on
            return
        host = torch.empty(x.shape, dtype=x.dtype, pin_memory=True)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            host.copy_(x, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self.stream)
        x.record_stream(self.stream)  # not reused by the allocator before the copy is done
        child.kept[index], child.copied[index] = host, done

    def _memo_forward(self, child: _Child, full_forward):
        def forward(*args: Any, **kwargs: Any) -> Any:
            index = self.index
            if child.broken or index is None or index not in child.kept:
                return full_forward(*args, **kwargs)
            if child.checked:
                return self._shortcut(child, index, full_forward, args, kwargs)
            full = full_forward(*args, **kwargs)
            short = self._shortcut(child, index, full_forward, args, kwargs)
            child.checked = True
            if not _same(full, short):
                child.broken = True
                log.warning("child_memo_dropped", child=child.name, micro_batch=index,
                            why="the child's output differs when computed from its last linear's kept input")
                child.kept.clear()
                child.fetched.clear()
            return full
        return forward

    def _shortcut(self, child: _Child, index: int, full_forward, args: tuple, kwargs: dict) -> Any:
        """C's forward with its other linears returning zeros and Lc reading the kept input."""
        x = self._on_device(child, index)
        child.shortcuts += 1
        patched = []
        for name in child.others:
            linear = self.block.get_submodule(name)
            linear.forward = lambda inp, n=linear.out_features: inp.new_zeros(*inp.shape[:-1], n)
            patched.append(linear)
        last = self.block.get_submodule(child.last)
        last_forward = last.forward
        last.forward = lambda _inp: last_forward(x)
        patched.append(last)
        try:
            return full_forward(*args, **kwargs)
        finally:
            for linear in patched:
                del linear.forward

    def _on_device(self, child: _Child, index: int) -> torch.Tensor:
        if not self.on_host:
            return child.kept[index]
        for ahead in range(index, min(index + PREFETCH_MICRO_BATCHES, self.n_micro_batches)):
            if ahead not in child.fetched and ahead in child.kept:
                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(child.copied[ahead])
                    on_gpu = child.kept[ahead].to(self.device, non_blocking=True)
                    done = torch.cuda.Event()
                    done.record(self.stream)
                child.fetched[ahead] = (on_gpu, done)
        x, done = child.fetched.pop(index)
        current = torch.cuda.current_stream(self.device)
        current.wait_event(done)
        x.record_stream(current)
        return x


# the memo stays on the GPU where a block of its structure peaked below this share of the GPU's memory with
# the memo in host memory, the memo's bytes added; before any such block, where the memo is at most
# FIRST_ON_GPU_SHARE of it (the 8B block's 9.6 GB: yes; the 70B's 19 GB, the 405B's 36 GB: no) and the block
# has no routed experts (their Hessians and padded batches make an MoE block's peak hard to foresee)
ON_GPU_SHARE = 0.85
FIRST_ON_GPU_SHARE = 0.15
# host memory (pinned for a GPU, the compute memory of a CPU worker) a memo may take, of what is available
# when the block is planned: past it the block runs without one (a CPU worker's 8B memo would be 15 GB)
HOST_SHARE = 0.5


@dataclass(frozen=True)
class GpuRoom:
    total: int  # the GPU's memory
    peak_with_memo_on_host: tuple[int, int] | None  # an earlier block of this structure: (its peak, its memo's bytes)
    moe: bool = False  # the block holds routed experts


def memo_placement(planned_bytes: int, gpu: GpuRoom | None, host_available: int) -> str | None:
    """"device" (a CPU worker's memory, or the GPU where it has room), "host" (pinned, a GPU worker's) or
    None (no memo: it would take too much of the host's available memory)."""
    if planned_bytes == 0:
        return "device"
    if gpu is not None:
        if gpu.peak_with_memo_on_host is None:
            on_gpu = not gpu.moe and planned_bytes <= FIRST_ON_GPU_SHARE * gpu.total
        else:
            peak, memo_bytes = gpu.peak_with_memo_on_host
            on_gpu = peak + memo_bytes <= ON_GPU_SHARE * gpu.total
        if on_gpu:
            return "device"
    if planned_bytes > HOST_SHARE * host_available:
        return None
    return "host" if gpu is not None else "device"


def memo_pass(memo: ChildMemo | None, n_micro_batches: int) -> contextlib.AbstractContextManager:
    """`memo.run`, or nothing where a pass has no memo (a replayed block, child_memo off)."""
    return memo.run(n_micro_batches) if memo is not None else contextlib.nullcontext()


def memo_micro_batch(memo: ChildMemo | None, index: int) -> contextlib.AbstractContextManager:
    """`memo.micro_batch`, or nothing where a pass has no memo."""
    return memo.micro_batch(index) if memo is not None else contextlib.nullcontext()


def _memo_children(block: nn.Module, stages: list[list[InputGroup]], once_called: frozenset[str]) -> list[_Child]:
    """Children called once per block forward, holding two or more stages of their own, the last of them one
    linear, with every quantizable linear inside them in those stages and no routed experts (their routing
    reads the input, and zeros would route elsewhere)."""
    holders = [stage_holder(s) for s in stages]
    linears = quantizable_linears(block)
    children = []
    for name in sorted({h for h in holders if h is not None and h in once_called}):
        own = [i for i, h in enumerate(holders) if h == name]
        inside = [lin for lin in linears if lin.startswith(name + ".")]
        staged = [lin for i in own for g in stages[i] for lin in g.linears]
        last = stages[own[-1]]
        if (len(own) < 2 or len(last) != 1 or len(last[0].linears) != 1 or sorted(staged) != sorted(inside)
                or routed_experts(block.get_submodule(name))):
            continue
        lc = last[0].linears[0]
        children.append(_Child(name=name, last=lc, others=tuple(lin for lin in inside if lin != lc), stage=own[-1]))
    return children


def _same(a: Any, b: Any) -> bool:
    """Bitwise equality of two forward outputs (tensors inside tuples, lists, dicts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return a is b or a == b

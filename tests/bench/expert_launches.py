"""Host work of an MoE block's expert stages, per-expert against padded batches (workers/expert_padding.py).

    python -m tests.bench.expert_launches [--experts 128 --top-k 8 --tokens 16384 --micro-batches 4]

On a GPU the per-expert path of the routed collect and the expert forward is bound by the host (one
gather, GEMMs and a Hessian update per expert and micro-batch: ~40 k launches per Qwen3-30B-A3B block).
This counts the torch operators each path dispatches (each is at least one launch on CUDA) and their CPU
wall, on any device, for a RoutedExperts of the given expert count and routing with small widths (the
operator count does not depend on the widths): the gate/up stage's collect, the down stage's collect
and the gated forward, each over --micro-batches calls.
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from rayquant.workers import expert_padding, moe
from rayquant.workers.expert_collect import ExpertStageCollector, StageCollected


def _experts(E: int, hidden: int, intermediate: int, device: str) -> moe.RoutedExperts:
    g = torch.Generator().manual_seed(0)
    experts = [moe._Expert(("gate_proj", "up_proj", "down_proj"), hidden, intermediate, torch.float32)
               for _ in range(E)]
    module = moe.RoutedExperts(experts, nn.SiLU())
    for expert in experts:
        for name in expert.names:
            lin = getattr(expert, name)
            lin.weight = nn.Parameter(torch.randn(lin.out_features, lin.in_features, generator=g) * 0.1,
                                      requires_grad=False)
    return module.to(device)


def _count(fn) -> tuple[int, float]:
    """Operators dispatched and CPU seconds of fn()."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        t = time.perf_counter()
        fn()
        seconds = time.perf_counter() - t
    return sum(1 for e in prof.events() if e.name.startswith("aten::") and e.cpu_parent is None), seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=16384, help="per micro-batch")
    parser.add_argument("--micro-batches", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=32)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    module = _experts(args.experts, args.hidden, args.intermediate, device)
    g = torch.Generator().manual_seed(1)
    calls = [(torch.randn(args.tokens, args.hidden, generator=g).to(device),
              torch.randint(0, args.experts, (args.tokens, args.top_k), generator=g).to(device),
              torch.rand(args.tokens, args.top_k, generator=g).to(device)) for _ in range(args.micro_batches)]
    K = {"gate_up": args.hidden, "down": args.intermediate}
    print(f"{args.experts} experts, top-{args.top_k}, {args.micro_batches} × {args.tokens} tokens, on {device}")
    print(f"{'':24}{'per expert':>22}{'padded':>22}")
    for what in ("gate_up collect", "down collect", "forward"):
        row = []
        for padded in (False, True):
            def run():
                with torch.no_grad():
                    if what == "forward":
                        moe.PADDED_DEVICES = (device,) if padded else ()
                        for call in calls:
                            module(*call)
                        return
                    role = what.split()[0]
                    module.collector = ExpertStageCollector(
                        module, list(range(args.experts)), role,
                        torch.zeros(args.experts, K[role], K[role], device=device), 64, padded)
                    try:
                        for call in calls:
                            try:
                                module(*call)
                            except StageCollected:
                                pass
                    finally:
                        module.collector = None
            run()  # warm-up
            if device == "cuda":
                torch.cuda.synchronize()
            ops, seconds = _count(run)
            row.append(f"{ops:>8} ops {seconds * 1e3:>8.1f} ms")
        print(f"{what:<24}{row[0]:>22}{row[1]:>22}")
    moe.PADDED_DEVICES = expert_padding.PADDED_DEVICES


if __name__ == "__main__":
    main()

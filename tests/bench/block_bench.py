"""One transformer block at full size on one GPU: per-stage seconds, peak memory, projection.

    python -m tests.bench.block_bench --preset llama-70b [--samples 128 --seq-len 2048 --blocks 2]
                                      [--desc-act] [--no-baseline]

Runs the real BlockWorker in-process (no Ray: it cannot travel to the GPU machine) on
`synthetic://<preset>`, whose weights are generated on the GPU from a seed. Block 0 warms up
(kernel compilation); the last block is the one reported. Beside it, the paper's Algorithm 1
(`tests/bench/algorithm1.py`: lazy 128-column batches, one column at a time inside a batch,
Cholesky of H⁻¹) solves the same 7 linears from the same Hessians, timed in the same run.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import time

import structlog
import torch

from rayquant.solver.gptq import GPTQConfig, solve_input_group
from rayquant.workers.moe import MoEConfig
from tests.bench.algorithm1 import layer_loss, plain_gptq
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup

STAGES = ("load", "plan", "collect", "reduce", "solve", "baseline", "validate", "share", "advance", "eval", "handoff")


class BaselineTimedWorker(BlockWorker):
    """The production worker, plus Algorithm 1 on each input group's linears right after its solve."""

    def __init__(self, setup: WorkerSetup, run_baseline: bool):
        super().__init__(setup)
        self.run_baseline = run_baseline
        self.check_unbatched = False
        self.baseline: dict[str, tuple[float, float]] = {}  # linear -> (seconds, loss)
        self.unbatched: list[tuple] = []  # (linear, batched loss, loss solved alone, damping of each, tokens, ...)
        self.stage_times: list[tuple[int, str, int, dict[str, float]]] = []  # (block, first group, groups, seconds)

    def _collect(self, block, stage, stage_inputs, stage_idx, unread):
        before = dict(self.clock.seconds)
        out = super()._collect(block, stage, stage_inputs, stage_idx, unread)
        self._stage_delta(stage, before, "collect")
        return out

    def _solve_stage(self, block_idx, block, stage, strategy, reduced, samples, routed):
        before = dict(self.clock.seconds)
        out = super()._solve_stage(block_idx, block, stage, strategy, reduced, samples, routed)
        self._stage_delta(stage, before, "solve")
        return out

    def _stage_delta(self, stage, before, step) -> None:
        """Seconds each clock key gained over one sub-stage's collect or solve (--stage-times)."""
        delta = {k: v - before.get(k, 0.0) for k, v in self.clock.seconds.items() if v - before.get(k, 0.0) > 0}
        self.stage_times.append((self.clock.now[0], f"{step}:{stage[0].name}", len(stage), delta))

    def _solve_groups(self, block_idx, block, works):
        out = super()._solve_groups(block_idx, block, works)
        if self.check_unbatched and len(works) > 1:  # each input group solved alone on the same Hessian
            reports = {r.name: r for rs in out[1] for r in rs}
            prefix = self.layout.block_prefix(block_idx)
            for work in works:
                weights = [block.get_submodule(lin).weight for lin in work.group.linears]
                alone = solve_input_group(weights, work.hessian_sum, work.n_tokens, work.cfg)
                self.unbatched += [(lin, reports[prefix + lin].gptq_loss, a.loss, reports[prefix + lin].damp_percent,
                                    a.damp_percent, work.n_tokens, work, [w.clone() for w in weights])
                                   for lin, a in zip(work.group.linears, alone)]
        if self.run_baseline:
            cfg = self.setup.gptq
            for work in works:
                for lin in work.group.linears:
                    W = block.get_submodule(lin).weight.float()
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    Hm = work.hessian_sum.float() / work.n_tokens
                    loss = layer_loss(W, plain_gptq(W, Hm, cfg.bits, cfg.group_size, cfg.desc_act), Hm)
                    torch.cuda.synchronize()
                    self.baseline[lin] = (time.perf_counter() - t, loss)
        return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-70b")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--desc-act", action="store_true")
    parser.add_argument("--no-gar", action="store_true", help="paper column order instead of the spec's default GAR")
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--no-stage-shortcut", action="store_true",
                        help="every true_sequential stage runs the block forward (workers/stage_inputs.py off)")
    parser.add_argument("--no-child-memo", action="store_true",
                        help="later forwards compute whole children (workers/child_memo.py off)")
    parser.add_argument("--eval-samples", type=int, default=0, help="held-out windows flowing fp and quantized")
    parser.add_argument("--profile", action="store_true", help="print the last block's top GPU kernels")
    parser.add_argument("--hessian-tokens", choices=("all", "routed"), default=MoEConfig().hessian_tokens,
                        help="MoE: quant.moe.hessian_tokens")
    parser.add_argument("--stage-times", action="store_true",
                        help="print the last block's seconds per true_sequential sub-stage (collect, solve)")
    parser.add_argument("--check-unbatched", action="store_true",
                        help="MoE: after the last block's batched solves, solve every input group alone on the same "
                             "Hessian and print the largest relative loss difference")
    args = parser.parse_args()
    os.environ.setdefault("RAYQUANT_CACHE", "/tmp/rayquant-cache")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 where the solver asks for fp32
    gen = torch.Generator().manual_seed(0)
    samples = torch.randint(2, 1024, (args.samples, args.seq_len), generator=gen)
    cfg = GPTQConfig(bits=4, group_size=128, desc_act=args.desc_act, act_group_aware=not (args.desc_act or args.no_gar))
    setup = WorkerSetup(job_id="bench", rank=0, world_size=1, model_path=f"synthetic://{args.preset}",
                        gptq=cfg, true_sequential=True, micro_batch=args.micro_batch,
                        num_threads=8, device="cuda", eval_on=args.eval_samples > 0,
                        moe=MoEConfig(hessian_tokens=args.hessian_tokens))
    eval_samples = torch.randint(2, 1024, (args.eval_samples, args.seq_len), generator=gen)
    worker = BaselineTimedWorker(setup, run_baseline=False)
    worker.stage_shortcut = not args.no_stage_shortcut
    worker.child_memo = not args.no_child_memo
    t = time.perf_counter()
    n_blocks = worker.start(worker.rendezvous_address(), samples, eval_samples)
    torch.cuda.synchronize()
    embed_s = time.perf_counter() - t
    results = []
    for b in range(args.blocks):
        worker.run_baseline = not args.no_baseline and b == args.blocks - 1
        worker.check_unbatched = args.check_unbatched and b == args.blocks - 1
        torch.cuda.synchronize()
        t = time.perf_counter()
        last_block = b == args.blocks - 1
        if args.profile and last_block:
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                r = worker.run_block(BlockTask("bench", b))
        else:
            r = worker.run_block(BlockTask("bench", b))
        torch.cuda.synchronize()
        results.append((dataclasses.replace(r, tensors=None), time.perf_counter() - t))
        del r  # the part is freed as the driver's copy is taken: its pinned host buffers are reused
    worker.stop()
    if args.profile:
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70))

    last, wall = results[-1]
    if args.stage_times:
        print(f"\nblock {last.block_idx} per sub-stage (first group, groups, seconds by clock key)")
        for b, name, n, delta in worker.stage_times:
            if b == last.block_idx:
                print(f"  {name:<48} {n:4d} " + " ".join(f"{k} {v:.3f}" for k, v in sorted(delta.items())))
    if worker.unbatched:
        ranked = sorted(worker.unbatched, key=lambda u: -abs(u[1] - u[2]) / max(u[2], 1e-30))
        worst = ranked[0]
        print(f"batched vs each input group alone: {len(worker.unbatched)} linears, largest relative loss difference "
              f"{abs(worst[1] - worst[2]) / worst[2]:.2e} ({worst[0]}: {worst[1]:.6g} vs {worst[2]:.6g})")
        # the noise floor: the same solve in float64 on the same Hessian, for the three worst
        for lin, batched, alone, damp_b, damp_a, n_tokens, work, weights in ranked[:3]:
            weights = [w.double() for w in weights]
            exact = solve_input_group(weights, work.hessian_sum.double(), n_tokens, work.cfg)
            f64 = exact[work.group.linears.index(lin)].loss
            print(f"  {lin}: batched {batched:.6g} alone {alone:.6g} float64 {f64:.6g} (alone vs float64 "
                  f"{abs(alone - f64) / f64:.2e}, batched vs float64 {abs(batched - f64) / f64:.2e}); damp "
                  f"{damp_b} / {damp_a}; {n_tokens} tokens")
    block_s = sum(last.seconds.get(s, 0.0) for s in STAGES)
    print(f"\n{args.preset}: {args.samples} x {args.seq_len} tokens, 4-bit g128, desc_act={args.desc_act}, act_group_aware={cfg.act_group_aware}, "
          f"hessian_tokens={args.hessian_tokens}, "
          f"{torch.cuda.get_device_name()}")
    print(f"embed (start) {embed_s:.2f} s; blocks run {args.blocks}, reporting block {last.block_idx}")
    print("stage      " + " ".join(f"{s:>9}" for s in STAGES) + "      sum")
    for r, _ in results:
        print(f"block {r.block_idx:<4} " + " ".join(f"{r.seconds.get(s, 0.0):9.3f}" for s in STAGES)
              + f" {sum(r.seconds.get(s, 0.0) for s in STAGES):8.3f}")
    print(f"peak GPU memory {last.peak_memory_bytes / 2**30:.1f} GiB; block wall {wall:.2f} s")
    print(f"projected model: {n_blocks} blocks x {wall:.2f} s (block wall; stages sum {block_s:.2f} s) + embed = "
          f"{(n_blocks * wall + embed_s) / 60:.1f} min on one GPU")
    if worker.baseline:
        ours = {x.name.rsplit(".", 2)[-2] + "." + x.name.rsplit(".", 1)[-1]: x for x in last.layers}
        base_total = sum(s for s, _ in worker.baseline.values())
        print("\nAlgorithm 1 baseline vs rayquant solve on the same Hessians")
        print(f"{'linear':<22}{'baseline s':>11}{'loss ratio':>12}")
        for lin, (sec, loss) in worker.baseline.items():
            mine = ours.get(lin)
            ratio = mine.gptq_loss / loss if mine and loss > 0 else math.nan
            print(f"{lin:<22}{sec:11.2f}{ratio:12.4f}")
        print(f"solve: baseline {base_total:.2f} s, rayquant {last.seconds['solve']:.2f} s "
              f"-> {base_total / last.seconds['solve']:.1f}x")


if __name__ == "__main__":
    main()

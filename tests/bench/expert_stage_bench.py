"""One MoE expert stage's solve on one GPU: batched Cholesky (cuSOLVER against panels), then the stage's GPTQ
solve, RTN baseline and packing, each timed alone.

    python -m tests.bench.expert_stage_bench [--experts 20 --hidden 7168 --intermediate 2048] [--profile]

Defaults: one cut gate/up stage of DeepSeek-V3 under hessian_tokens=routed (20 experts, each its own 7168²
Hessian from 8192 bf16 tokens; gate and up [2048, 7168] share it), 4-bit g128 GAR. The Cholesky table also
times the down projections' shape (256 × 2048²) and a wide dense one (4 × 16384²), cuSOLVER's batched call
(torch.linalg.cholesky_ex) beside `solver/batched_cholesky.factors_by_panels` per panel width, with the
largest difference of the factors relative to cuSOLVER's largest entry. --profile adds the CUDA and CPU
operator tables of one stage solve.
"""

from __future__ import annotations

import argparse
import time

import torch

from rayquant.solver.batched_cholesky import factors_by_panels
from rayquant.solver.gptq import GPTQConfig, GroupProblem, solve_input_groups
from rayquant.solver.pack import pack_linears
from rayquant.solver.rtn import quantize_rtn_many


def _timed(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - t, out


def _spd(E: int, K: int, generator: torch.Generator) -> torch.Tensor:
    X = torch.randn(E, K, K, device="cuda", generator=generator) / K ** 0.5
    return X @ X.mT + 0.01 * torch.eye(K, device="cuda")


def cholesky_table(repeats: int) -> None:
    generator = torch.Generator(device="cuda").manual_seed(0)
    for E, K in ((20, 7168), (5, 7168), (256, 2048), (4, 16384)):
        H = _spd(E, K, generator)
        reference = torch.linalg.cholesky_ex(H.clone())[0]
        base = min(_timed(lambda: torch.linalg.cholesky_ex(H.clone()))[0] for _ in range(repeats))
        row = f"E={E:<3} K={K:<5} cuSOLVER {base * 1e3:8.1f} ms"
        for panel in (512, 1024, 2048):
            if panel >= K:
                continue
            seconds, (L, _) = min((_timed(lambda: factors_by_panels(H.clone(), panel)) for _ in range(repeats)),
                                  key=lambda r: r[0])
            err = ((L - reference).abs().max() / reference.abs().max()).item()
            row += f" | panels {panel}: {seconds * 1e3:7.1f} ms ({base / seconds:.1f}x, diff {err:.1e})"
        print(row, flush=True)
        del H, reference
        torch.cuda.empty_cache()


def stage(args: argparse.Namespace) -> None:
    E, K, N = args.experts, args.hidden, args.intermediate
    generator = torch.Generator(device="cuda").manual_seed(1)
    sums = torch.empty(E, K, K, device="cuda")
    for e in range(E):
        X = torch.randn(args.tokens, K, device="cuda", generator=generator, dtype=torch.bfloat16)
        sums[e] = torch.mm(X.mT, X, out_dtype=torch.float32)
    weights = [[torch.randn(N, K, device="cuda", generator=generator, dtype=torch.bfloat16) * 0.02 for _ in range(2)]
               for _ in range(E)]
    cfg = GPTQConfig(bits=4, group_size=128, act_group_aware=True)
    problems = [GroupProblem(weights[e], sums[e], args.tokens) for e in range(E)]
    flat = [(e, w) for e in range(E) for w in weights[e]]
    for run in range(args.repeats):
        solve_s, results = _timed(lambda: solve_input_groups(problems, cfg))
        rtn_s, _ = _timed(lambda: quantize_rtn_many([w for _, w in flat], [sums[e] for e, _ in flat],
                                                    [args.tokens] * len(flat), cfg))
        pack_s, _ = _timed(lambda: pack_linears([r for rs in results for r in rs], cfg.bits))
        print(f"stage of {E} experts ({2 * E} linears {N}x{K}), run {run}: solve {solve_s:.3f} s, RTN baseline "
              f"{rtn_s:.3f} s, pack {pack_s:.3f} s", flush=True)
    if args.profile:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            solve_input_groups(problems, cfg)
            torch.cuda.synchronize()
        for key in ("cuda_time_total", "cpu_time_total"):
            print(prof.key_averages().table(sort_by=key, row_limit=20, max_name_column_width=60))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--experts", type=int, default=20)
    parser.add_argument("--hidden", type=int, default=7168)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--tokens", type=int, default=8192, help="routed tokens per expert (its Hessian's rows)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32 where the solver asks for fp32
    print(torch.cuda.get_device_name())
    cholesky_table(args.repeats)
    stage(args)


if __name__ == "__main__":
    main()

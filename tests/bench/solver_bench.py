"""GPTQ solve of one Llama-70B block on one GPU: a plain Algorithm 1 (the baseline, written here) against
rayquant's solver, with and without act-order, measured in the same run; and the block's Hessians from
bf16 activations with fp32 accumulation against an fp32-activation accumulation (issue 4, items 1-2).

    python -m tests.bench.solver_bench [--tokens 16384] [--hessian-tokens 262144] [--repeats 3]
                                       [--profile] [--json PATH]
    python -m tests.bench.solver_bench --device cpu --shrink 64 --tokens 1024 --hessian-tokens 32768  # smoke

The 7 linears: q 8192×8192, k/v 1024×8192, o 8192×8192, gate/up 28672×8192, down 8192×28672 (out × in),
4-bit, group 128, symmetric. Hessians come from random correlated bf16 activations with outlier channels
(--tokens of them, built on the GPU). The baseline solves each linear alone, as the authors' reference
`fasterquant` does: Cholesky, cholesky_inverse, Cholesky; 128-column batches; one column at a time
inside a batch, ~10 launches per column. rayquant solves each input group stacked (q/k/v, gate/up), the
median of --repeats runs after a warm-up. Losses tr((W - Q) H (W - Q)ᵀ) of both are recomputed here the
same way, outside the timed region; loss_err compares the solver's own loss with that recomputation.
The Hessian item: accuracy over --hessian-tokens (K = 8192 also against fp64, for several tensor-core
product lengths of the cuBLAS path and CHUNK_TOKENS of the Triton kernel, solver/hessian_triton.py), seconds
for the block's four Hessians per variant (and Triton tile configs), and seconds of a Llama-405B block's
Hessians (K = 16384 three times, 53248 once) from calls of 8192 tokens, cuBLAS beside Triton. --profile
adds the CUDA kernel table of one solve, a sweep of the fused loop's UPDATE_COLUMNS / BLOCK_ROWS and the
lazy-update GEMM's rate. Prints a table last. Needs CUDA (and triton for rayquant's fused path).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import statistics
import time

import torch

from tests.bench.algorithm1 import plain_gptq

from rayquant.solver import hessian
from rayquant.solver.gptq import GPTQConfig, _cholesky_factors, dequantize, solve_input_group
from rayquant.solver.hessian import accumulate_hessian

INPUT_GROUPS = {"qkv": ["q", "k", "v"], "o": ["o"], "gate_up": ["gate", "up"], "down": ["down"]}
CHUNK_TOKENS = 16384  # activations per accumulate_hessian call, as a worker's forward micro-batch
DEVICE = torch.device("cuda")
LINEARS: dict[str, tuple[int, int]] = {}  # name -> (out_features, in_features), set by set_shapes


def set_shapes(shrink: int) -> None:
    """Llama-70B's block (hidden 8192, kv 1024, intermediate 28672), every size divided by `shrink`."""
    hidden, kv, intermediate = 8192 // shrink, 1024 // shrink, 28672 // shrink
    LINEARS.update(q=(hidden, hidden), k=(kv, hidden), v=(kv, hidden), o=(hidden, hidden),
                   gate=(intermediate, hidden), up=(intermediate, hidden), down=(hidden, intermediate))


def sync_time() -> float:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter()


# --- inputs --------------------------------------------------------------------------------------

class Activations:
    """bf16 activations x = (z + g M) · s: correlated channels (a shared rank-32 part), log-normal
    channel scales and 1/128 of the channels 20× larger (LLM outlier channels)."""

    def __init__(self, in_features: int, seed: int):
        self.gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.mix = torch.randn(32, in_features, generator=self.gen, device=DEVICE) * 0.5
        self.scale = torch.exp(0.5 * torch.randn(in_features, generator=self.gen, device=DEVICE))
        outliers = torch.randperm(in_features, generator=self.gen, device=DEVICE)[: in_features // 128]
        self.scale[outliers] *= 20.0

    def chunk(self, tokens: int) -> torch.Tensor:
        z = torch.randn(tokens, self.mix.shape[1], generator=self.gen, device=DEVICE)
        z.addmm_(torch.randn(tokens, 32, generator=self.gen, device=DEVICE), self.mix)
        return (z * self.scale).bfloat16()


def block_weights(seed: int) -> dict[str, torch.Tensor]:
    """fp32 copies of bf16 weights (the worker solves weight.float()) with row and column scales."""
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    weights = {}
    for name, (N, K) in LINEARS.items():
        w = torch.randn(N, K, generator=gen, device=DEVICE) * 0.02
        w *= torch.exp(0.2 * torch.randn(N, 1, generator=gen, device=DEVICE))
        w *= torch.exp(0.2 * torch.randn(1, K, generator=gen, device=DEVICE))
        weights[name] = w.bfloat16().float()
    return weights


def block_hessians(tokens: int, seed: int) -> dict[str, torch.Tensor]:
    sums = {}
    for i, (group, names) in enumerate(INPUT_GROUPS.items()):
        K = LINEARS[names[0]][1]
        source = Activations(K, seed + i)
        sums[group] = torch.zeros(K, K, device=DEVICE)
        for start in range(0, tokens, CHUNK_TOKENS):
            accumulate_hessian(sums[group], source.chunk(min(CHUNK_TOKENS, tokens - start)))
    return sums


def output_error(weight: torch.Tensor, Q: torch.Tensor, hessian_sum: torch.Tensor, n_tokens: int) -> float:
    E = weight - Q
    return float(torch.sum((E @ hessian_sum) * E, dtype=torch.float64)) / n_tokens


# --- the runs ------------------------------------------------------------------------------------

def run_baseline(weights, hessians, tokens, act_order) -> dict:
    seconds, losses = {}, {}
    for group, names in INPUT_GROUPS.items():
        for name in names:
            t = sync_time()
            Q = plain_gptq(weights[name], hessians[group] / tokens, 4, 128, act_order)
            seconds[name] = sync_time() - t
            losses[name] = output_error(weights[name], Q, hessians[group], tokens)
            del Q
    return {"seconds": seconds, "losses": losses}


def run_rayquant(weights, hessians, tokens, act_order, repeats) -> dict:
    cfg = GPTQConfig(bits=4, group_size=128, desc_act=act_order, sym=True)
    runs = []
    for _ in range(repeats):
        seconds, results = {}, {}
        for group, names in INPUT_GROUPS.items():
            t = sync_time()
            out = solve_input_group([weights[n] for n in names], hessians[group], tokens, cfg)
            seconds[group] = sync_time() - t
            results.update(zip(names, out))
        runs.append((seconds, results))
    median = {g: statistics.median(r[0][g] for r in runs) for g in INPUT_GROUPS}
    results = runs[-1][1]
    losses, reported = {}, {}
    for group, names in INPUT_GROUPS.items():
        for name in names:
            res = results[name]
            Q = dequantize(res.codes, res.scales, res.zeros, res.g_idx)
            losses[name] = output_error(weights[name], Q, hessians[group], tokens)
            reported[name] = res.loss
    return {"seconds": median, "all_seconds": [r[0] for r in runs], "losses": losses, "reported_losses": reported}


def factorization_seconds(hessians, tokens: int) -> dict:
    """rayquant's factor (one Cholesky of the reversed damped H; the fused path needs no inverse) vs the
    reference's U: cholesky → cholesky_inverse → cholesky."""
    out = {}
    for group in ("o", "down"):
        H = hessians[group] / tokens
        K = H.shape[0]
        if group == "o":  # warm-up: cuSOLVER handles and workspaces
            _cholesky_factors(H[None], [tokens], GPTQConfig(), None)
            _reference_factor(H)
        t = sync_time()
        L = _cholesky_factors(H[None], [tokens], GPTQConfig(), None)[0][0]
        out[f"rayquant_{K}"] = sync_time() - t
        t = sync_time()
        U = _reference_factor(H)
        out[f"reference_{K}"] = sync_time() - t
        # U = R⁻¹ with R = J L J: check R U = I on a column sample, relative to ‖R‖‖U‖
        R = L.flip(0, 1)
        cols = torch.arange(0, K, 97, device=H.device)
        eye = torch.zeros(K, cols.numel(), device=H.device)
        eye[cols, torch.arange(cols.numel(), device=H.device)] = 1
        out[f"RU_minus_I_{K}"] = float(torch.linalg.norm(R @ U[:, cols] - eye) / cols.numel() ** 0.5)
        del L, U, R, H
    return out


def _reference_factor(H: torch.Tensor) -> torch.Tensor:
    damped = H.clone()
    damped.diagonal().add_(0.01 * torch.mean(torch.diagonal(H)))
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(damped)), upper=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    norm = torch.linalg.vector_norm
    return float(norm(a - b, dtype=torch.float64) / norm(b, dtype=torch.float64))


@contextlib.contextmanager
def hessian_path(kernel: str, chain: int | None = None, **triton_constants):
    """accumulate_hessian's tensor-core path set for a measurement: kernel "cublas" with `chain` tokens per
    product (TENSOR_CORE_TOKENS), or "triton" with solver/hessian_triton.py's constants overridden."""
    saved = hessian.HESSIAN_KERNEL, hessian.TENSOR_CORE_TOKENS
    hessian.HESSIAN_KERNEL = kernel
    if chain is not None:
        hessian.TENSOR_CORE_TOKENS = chain
    module = None
    if kernel == "triton":
        from rayquant.solver import hessian_triton as module
        saved_triton = {name: getattr(module, name) for name in triton_constants}
        for name, value in triton_constants.items():
            setattr(module, name, value)
    try:
        yield
    finally:
        hessian.HESSIAN_KERNEL, hessian.TENSOR_CORE_TOKENS = saved
        if module is not None:
            for name, value in saved_triton.items():
                setattr(module, name, value)


def hessian_variants(chains: list[int], chunks: list[int]) -> dict[str, dict]:
    """name -> hessian_path arguments: cuBLAS at each tokens-per-product, the Triton kernel at each CHUNK_TOKENS."""
    return {**{f"cublas{c}": dict(kernel="cublas", chain=c) for c in chains},
            **{f"triton{c}": dict(kernel="triton", CHUNK_TOKENS=c) for c in chunks}}


# Triton tile configs timed besides the module's (TILE, STEP_TOKENS, NUM_STAGES, NUM_WARPS)
TRITON_TILES = {"t128s64st3": dict(NUM_STAGES=3), "t128s32st4": dict(STEP_TOKENS=32, NUM_STAGES=4),
                "t128s128st3": dict(STEP_TOKENS=128, NUM_STAGES=3),
                "t64s64st4w4": dict(TILE=64, NUM_STAGES=4, NUM_WARPS=4)}


def hessian_accuracy(in_features: int, tokens: int, seed: int, variants: dict[str, dict], fp64: bool) -> dict:
    """Relative Frobenius differences over `tokens` bf16 activations: accumulate_hessian in each variant
    (`hessian_variants`) against H from x.float() (fp32 GEMMs) and, with fp64, all against an fp64 sum."""
    source = Activations(in_features, seed)
    sums = {v: torch.zeros(in_features, in_features, device=DEVICE) for v in variants}
    fp32 = torch.zeros(in_features, in_features, device=DEVICE)
    exact = torch.zeros(in_features, in_features, device=DEVICE, dtype=torch.float64) if fp64 else None
    for start in range(0, tokens, CHUNK_TOKENS):
        x = source.chunk(min(CHUNK_TOKENS, tokens - start))
        for v, settings in variants.items():
            with hessian_path(**settings):
                accumulate_hessian(sums[v], x)
        xf = x.float()
        fp32.addmm_(xf.T, xf)
        if fp64:
            xd = x.double()
            exact.addmm_(xd.T, xd)
        del xf
    out = {f"{v}_vs_fp32": relative(sums[v], fp32) for v in variants}
    if fp64:
        out.update({f"{v}_vs_fp64": relative(sums[v], exact) for v in variants})
        out["fp32_vs_fp64"] = relative(fp32, exact)
    return out


def hessian_chain_seconds(tokens: int, seed: int, variants: dict[str, dict]) -> dict:
    """hessian_block_seconds' total (the 4 Hessians of one 70B block) for each variant."""
    out = {}
    for v, settings in variants.items():
        with hessian_path(**settings):
            out[v] = sum(s for k, s in hessian_block_seconds(tokens, seed).items() if k in INPUT_GROUPS)
    return out


def hessian_405b_seconds(calls: int, seed: int, variants: dict[str, dict], shrink: int) -> dict:
    """Seconds for `calls` accumulate_hessian calls of 8192 tokens (mirror=False, one mirror_upper after the
    last, as the worker collects) into a Llama-405B Hessian: K = 16384 (q/k/v, o, gate/up inputs) and 53248
    (down), per variant; "block" = 3 × the first + the second."""
    out = {}
    for K in (16384 // shrink, 53248 // shrink):
        source = Activations(K, seed)
        chunks = [source.chunk(8192) for _ in range(2)]
        H = torch.zeros(K, K, device=DEVICE)
        for v, settings in variants.items():
            with hessian_path(**settings):
                accumulate_hessian(H, chunks[0])  # warm-up: cuBLAS heuristics, Triton's compile
                t = sync_time()
                for c in range(calls):  # as the worker collects: mirrored once after the last call
                    accumulate_hessian(H, chunks[c % 2], mirror=False)
                hessian.mirror_upper(H)
                out[f"{v}_K{K}"] = sync_time() - t
        del chunks, H
    for v in variants:
        out[f"{v}_block"] = 3 * out[f"{v}_K{16384 // shrink}"] + out[f"{v}_K{53248 // shrink}"]
    return out


def hessian_block_seconds(tokens: int, seed: int) -> dict:
    """The 4 Hessians of one 70B block (q/k/v, o and gate/up inputs 8192 wide, down's 28672) from
    `tokens` bf16 activations each, in CHUNK_TOKENS calls; two distinct chunks per width alternate."""
    out = {}
    for group, names in INPUT_GROUPS.items():
        K = LINEARS[names[0]][1]
        source = Activations(K, seed)
        chunks = [source.chunk(CHUNK_TOKENS) for _ in range(2)]
        H = torch.zeros(K, K, device=DEVICE)
        accumulate_hessian(H, chunks[0])  # warm-up: cuBLAS handles and heuristics
        H.zero_()
        t = sync_time()
        for c in range(tokens // CHUNK_TOKENS):
            accumulate_hessian(H, chunks[c % 2])
        out[group] = sync_time() - t
        if group == "down" and DEVICE.type == "cuda":  # one plain product per call, for comparison
            t = sync_time()
            for c in range(tokens // CHUNK_TOKENS):
                torch.addmm(H, chunks[c % 2].T, chunks[c % 2], out_dtype=torch.float32, out=H)
            out["down_one_product_per_call"] = sync_time() - t
        del chunks, H
    return out


def lazy_update_precisions(weights, hessians, tokens) -> dict:
    """The block solve (paper order) with the fused loop's lazy update in each precision of
    solver/split_matmul.py: seconds (best of 2 after a warm-up), loss against fp32's, codes equal to fp32's."""
    from rayquant.solver import gptq_fused
    from rayquant.solver.split_matmul import PRECISIONS
    default = gptq_fused.LAZY_UPDATE_PRECISION
    cfg = GPTQConfig(bits=4, group_size=128)
    runs = {}
    try:
        for precision in PRECISIONS:
            gptq_fused.LAZY_UPDATE_PRECISION = precision
            times = []
            for _ in range(3):
                t = sync_time()
                results = {g: solve_input_group([weights[n] for n in names], hessians[g], tokens, cfg)
                           for g, names in INPUT_GROUPS.items()}
                times.append(sync_time() - t)
            runs[precision] = (min(times[1:]), results)
    finally:
        gptq_fused.LAZY_UPDATE_PRECISION = default
    out = {}
    fp32 = runs["fp32"][1]
    for precision, (seconds, results) in runs.items():
        same = sum(int((a.codes == b.codes).sum()) for g in INPUT_GROUPS for a, b in zip(results[g], fp32[g]))
        total = sum(a.codes.numel() for g in INPUT_GROUPS for a in results[g])
        loss = sum(r.loss for g in INPUT_GROUPS for r in results[g])
        out[precision] = {"seconds": seconds, "loss_vs_fp32": loss / sum(r.loss for g in INPUT_GROUPS for r in fp32[g]),
                          "codes_equal_fp32": same / total}
    return out


def sweep_fused(weights, hessians, tokens) -> dict:
    """Block solve seconds (no act-order, best of 2) for other UPDATE_COLUMNS / BLOCK_ROWS of the fused loop."""
    from rayquant.solver import gptq_fused
    defaults = gptq_fused.UPDATE_COLUMNS, gptq_fused.BLOCK_ROWS
    cfg = GPTQConfig(bits=4, group_size=128)
    out = {}
    try:
        for update, rows in ((128, 16), (256, 16), (512, 16), (1024, 16), (512, 8), (512, 32)):
            gptq_fused.UPDATE_COLUMNS, gptq_fused.BLOCK_ROWS = update, rows
            times = []
            for _ in range(3):  # the first compiles the kernel variant
                t = sync_time()
                for group, names in INPUT_GROUPS.items():
                    solve_input_group([weights[n] for n in names], hessians[group], tokens, cfg)
                times.append(sync_time() - t)
            out[f"update{update}_rows{rows}"] = min(times[1:])
    finally:
        gptq_fused.UPDATE_COLUMNS, gptq_fused.BLOCK_ROWS = defaults
    return out


def gemm_layout_seconds() -> dict:
    """The fused loop's lazy update Z[:, s2:] += D R[s1:s2, s2:] at down_proj's middle column, R column-major
    (as the Cholesky returns it) vs row-major."""
    N, K = LINEARS["down"]
    s1, s2 = K // 2 - 512, K // 2
    Z = torch.zeros(N, K, device=DEVICE)
    D = torch.randn(N, 512, device=DEVICE)
    R = torch.randn(K, K, device=DEVICE).T  # column-major
    out = {}
    for name, block in (("R_column_major", R[s1:s2, s2:]), ("R_row_major", R.contiguous()[s1:s2, s2:])):
        Z[:, s2:].addmm_(D, block)
        t = sync_time()
        for _ in range(10):
            Z[:, s2:].addmm_(D, block)
        seconds = (sync_time() - t) / 10
        out[name] = seconds
        out[name + "_tflops"] = 2 * N * 512 * (K - s2) / seconds / 1e12
    return out


def profile_block(weights, hessians, tokens) -> str:
    from torch.profiler import ProfilerActivity, profile
    cfg = GPTQConfig(bits=4, group_size=128)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for group, names in INPUT_GROUPS.items():
            solve_input_group([weights[n] for n in names], hessians[group], tokens, cfg)
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)


def main() -> None:
    global DEVICE
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=16384, help="calibration tokens behind the solve Hessians")
    parser.add_argument("--hessian-tokens", type=int, default=128 * 2048, help="tokens for the Hessian item")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--shrink", type=int, default=1, help="divide every shape by this (smoke runs)")
    parser.add_argument("--device", default="cuda", help="cpu: a smoke run of the script itself")
    parser.add_argument("--profile", action="store_true", help="print the CUDA kernels of one rayquant solve")
    parser.add_argument("--json", default=None, help="also write every number to this file")
    args = parser.parse_args()
    DEVICE = torch.device(args.device)
    set_shapes(args.shrink)
    hidden, intermediate = LINEARS["down"]
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("solver_bench needs a CUDA GPU (or --device cpu for a smoke run)")
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"device {device}, torch {torch.__version__}, triton "
          f"{'yes' if importlib.util.find_spec('triton') else 'NO (torch column loop)'}, "
          f"allow_tf32 matmul={torch.backends.cuda.matmul.allow_tf32}", flush=True)
    report: dict = {"device": device, "torch": torch.__version__, "tokens": args.tokens, "shrink": args.shrink}

    t = time.perf_counter()
    from rayquant.solver import hessian_triton  # imports triton
    chain, chunk = hessian.TENSOR_CORE_TOKENS, hessian_triton.CHUNK_TOKENS
    pair = hessian_variants([chain], [chunk])  # the two paths as configured: cublas{chain}, triton{chunk}
    chunks = sorted({chunk, 256, 1024, 2048})
    report["hessian_rel_frobenius"] = {
        hidden: hessian_accuracy(hidden, args.hessian_tokens, 100,
                                 hessian_variants(sorted({chain, 16384, 8192, 4096, 1024}), chunks), fp64=True),
        intermediate: hessian_accuracy(intermediate, args.hessian_tokens, 101, pair, fp64=False)}
    report["hessian_seconds"] = hessian_block_seconds(args.hessian_tokens, seed=200)
    timed = {**hessian_variants(sorted({chain, 4096, 16384}), chunks),
             **{f"triton{chunk}_{name}": dict(kernel="triton", **cfg) for name, cfg in TRITON_TILES.items()}}
    report["hessian_seconds_by_chain"] = hessian_chain_seconds(args.hessian_tokens, 200, timed)
    report["hessian_405b_seconds"] = hessian_405b_seconds(max(1, args.hessian_tokens // 8192), 300, pair, args.shrink)
    print(f"hessians: {report['hessian_rel_frobenius']} {report['hessian_seconds']} "
          f"by variant {report['hessian_seconds_by_chain']} 405B {report['hessian_405b_seconds']} "
          f"({time.perf_counter() - t:.0f} s)", flush=True)

    weights = block_weights(seed=0)
    hessians = block_hessians(args.tokens, seed=1)
    report["factorization"] = factorization_seconds(hessians, args.tokens)
    print(f"factorization: {report['factorization']}", flush=True)
    run_rayquant(weights, hessians, args.tokens, act_order=False, repeats=1)  # warm-up: Triton compiles
    if args.profile and DEVICE.type == "cuda":
        print(profile_block(weights, hessians, args.tokens), flush=True)
        report["sweep"] = sweep_fused(weights, hessians, args.tokens)
        report["gemm_layout"] = gemm_layout_seconds()
        print(f"sweep {report['sweep']}\ngemm layout {report['gemm_layout']}", flush=True)
    report["lazy_update"] = lazy_update_precisions(weights, hessians, args.tokens)
    print(f"lazy update precision: {report['lazy_update']}", flush=True)
    for act_order in (False, True):
        key = "act_order" if act_order else "no_act_order"
        t = time.perf_counter()
        ours = run_rayquant(weights, hessians, args.tokens, act_order, args.repeats)
        print(f"{key} rayquant {ours['all_seconds']} ({time.perf_counter() - t:.0f} s)", flush=True)
        base = None if args.skip_baseline else run_baseline(weights, hessians, args.tokens, act_order)
        if base:
            print(f"{key} baseline {base['seconds']}", flush=True)
        report[key] = {"rayquant": ours, "baseline": base}
    report["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1, default=str)

    print(f"\nsolver, 7 linears of a Llama-70B block / {args.shrink}, 4-bit g128 sym, {args.tokens} tokens, {device}")
    print(f"{'config':<13} {'input_group':<11} {'baseline_s':>10} {'rayquant_s':>10} {'speedup':>8} "
          f"{'loss_ratio':>10} {'loss_err':>9}")
    for key in ("no_act_order", "act_order"):
        ours, base = report[key]["rayquant"], report[key]["baseline"]
        for group, names in INPUT_GROUPS.items():
            b = sum(base["seconds"][n] for n in names) if base else float("nan")
            r = ours["seconds"][group]
            loss_ratio = (sum(ours["losses"][n] for n in names) / sum(base["losses"][n] for n in names)
                          if base else float("nan"))
            # the solver's own loss (‖E‖² - λ‖W-Q‖² on the fused path) against the direct recomputation
            err = max(abs(ours["reported_losses"][n] / ours["losses"][n] - 1) for n in names)
            print(f"{key:<13} {group:<11} {b:>10.3f} {r:>10.3f} {b / r:>8.1f} {loss_ratio:>10.4f} {err:>9.1e}")
        b = sum(base["seconds"].values()) if base else float("nan")
        r = sum(ours["seconds"].values())
        loss_ratio = sum(ours["losses"].values()) / sum(base["losses"].values()) if base else float("nan")
        print(f"{key:<13} {'TOTAL':<11} {b:>10.3f} {r:>10.3f} {b / r:>8.1f} {loss_ratio:>10.4f}")
    hs = report["hessian_seconds"]
    total = sum(hs[g] for g in INPUT_GROUPS)
    print(f"hessians of one block, {args.hessian_tokens} bf16 tokens each: "
          + ", ".join(f"{g} {s:.3f} s" for g, s in hs.items()) + f"; total {total:.3f} s; "
          + f"rel Frobenius of the tensor-core sum ({chain} tokens a product) vs fp32 activations: "
          + ", ".join(f"K={K} {v[f'cublas{chain}_vs_fp32']:.2e}" for K, v in report["hessian_rel_frobenius"].items()))
    detail = report["hessian_rel_frobenius"][hidden]
    print(f"K={hidden} detail: " + ", ".join(f"{k} {v:.2e}" for k, v in detail.items()))
    by_variant = report["hessian_seconds_by_chain"]
    print("70B block Hessians (s) by variant: " + ", ".join(f"{k} {v:.3f}" for k, v in by_variant.items()))
    h405 = report["hessian_405b_seconds"]
    # rate of the K = 53248 calls counted as full products 2·T·K² (both paths compute about half of that)
    K_down = 53248 // args.shrink
    full_flops = 2 * max(1, args.hessian_tokens // 8192) * 8192 * K_down**2
    print(f"{'hessian path':<14} {'70B_block_s':>11} {'405B_block_s':>12} {'K16384_s':>9} {'K53248_s':>9} "
          f"{'K53248_TF/s':>11} {'vs_fp64_K' + str(hidden):>15} {'vs_fp32_K' + str(intermediate):>16}")
    for v in pair:
        down_s = h405[f"{v}_K{K_down}"]
        print(f"{v:<14} {by_variant[v]:>11.3f} {h405[f'{v}_block']:>12.3f} "
              f"{h405[f'{v}_K{16384 // args.shrink}']:>9.3f} {down_s:>9.3f} {full_flops / down_s / 1e12:>11.0f} {detail[f'{v}_vs_fp64']:>15.2e} "
              f"{report['hessian_rel_frobenius'][intermediate][f'{v}_vs_fp32']:>16.2e}")
    f = report["factorization"]
    print("U factor: " + ", ".join(f"{k} {v:.3g}" for k, v in f.items()) + f"; peak {report['peak_gib']:.1f} GiB")


if __name__ == "__main__":
    main()

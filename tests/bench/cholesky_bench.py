"""The damped Hessian's Cholesky at 405B widths: cuSOLVER's fp32 potrf beside a blocked right-looking
factorization whose trailing updates run as tf32x3 products on the tensor cores (solver/split_matmul.py).

    python -m tests.bench.cholesky_bench [--widths 16384,53248] [--blocks 4096,8192]

Per width: the seconds of each (median of --repeats after a warm-up), and their errors against the
damped matrix A (a calibration-like Hessian: rank-deficient activations with spread column scales, 1 %
damping): a residual probe |L(Lᵀv) − Av| / |Av| over random v in float64, and the two factors' relative
difference. GPU only.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rayquant.solver.split_matmul import addmm_split_


def blocked_cholesky_(A: torch.Tensor, block: int, precision: str = "tf32x3") -> int:
    """Lower Cholesky factor of A [K, K] (fp32, CUDA) in place (its lower triangle; the upper is left
    stale). Returns 0, or the 1-based column where A is not positive definite (as cholesky_ex's info)."""
    K = A.shape[0]
    for j in range(0, K, block):
        e = min(j + block, K)
        L11, info = torch.linalg.cholesky_ex(A[j:e, j:e])
        if int(info):
            return j + int(info)
        A[j:e, j:e] = L11
        if e == K:
            break
        L21 = torch.linalg.solve_triangular(L11.mT, A[e:, j:e], upper=True, left=False)
        A[e:, j:e] = L21
        addmm_split_(A[e:, e:], L21, L21.mT, precision, alpha=-1.0)  # the trailing update, on the tensor cores
    return 0


def _hessian(K: int, tokens: int, generator: torch.Generator) -> torch.Tensor:
    scales = torch.logspace(-2, 0, K, device="cuda")[torch.randperm(K, device="cuda", generator=generator)]
    A = torch.zeros(K, K, device="cuda")
    for t in range(0, tokens, 4096):
        X = torch.randn(4096, K, device="cuda", generator=generator) * scales
        A.addmm_(X.T, X)
    A /= tokens
    A.diagonal().add_(0.01 * A.diagonal().mean())
    return A


def _probe(L: torch.Tensor, A: torch.Tensor, generator: torch.Generator) -> float:
    """max over 4 random v of |L(Lᵀv) − Av| / |Av| in float64 (chunks of rows: no float64 copy of L)."""
    worst = 0.0
    K = A.shape[0]
    for _ in range(4):
        v = torch.randn(K, device="cuda", dtype=torch.float64, generator=generator)
        Ltv = torch.zeros(K, device="cuda", dtype=torch.float64)
        Av = torch.zeros(K, device="cuda", dtype=torch.float64)
        for r in range(0, K, 4096):
            rows = torch.tril(L[r:r + 4096].double(), diagonal=r)  # rows r.. of the lower factor
            Ltv += rows.T @ v[r:r + 4096]
            Av[r:r + 4096] = A[r:r + 4096].double() @ v
        LLtv = torch.cat([torch.tril(L[r:r + 4096].double(), diagonal=r) @ Ltv for r in range(0, K, 4096)])
        worst = max(worst, float((LLtv - Av).norm() / Av.norm()))
    return worst


def _timed(fn, repeats: int) -> float:
    fn()
    seconds = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t)
    return statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--widths", default="16384,53248")
    parser.add_argument("--blocks", default="4096,8192")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    generator = torch.Generator(device="cuda").manual_seed(0)
    print(torch.cuda.get_device_name())
    for K in (int(w) for w in args.widths.split(",")):
        A = _hessian(K, 8192, generator)
        L = torch.linalg.cholesky(A)
        seconds = _timed(lambda: torch.linalg.cholesky_ex(A), args.repeats)
        print(f"K={K}: cuSOLVER potrf {seconds:.3f} s, residual {_probe(L, A, generator):.2e}")
        for block in (int(b) for b in args.blocks.split(",")):
            work = torch.empty_like(A)

            def run():
                work.copy_(A)
                assert blocked_cholesky_(work, block) == 0

            total = _timed(run, args.repeats)
            copy = _timed(lambda: work.copy_(A), args.repeats)
            diff = float((torch.tril(work) - L).norm() / L.norm())
            print(f"K={K}: blocked b={block} tf32x3 {total - copy:.3f} s (+{copy:.3f} s copy), residual "
                  f"{_probe(work, A, generator):.2e}, vs cuSOLVER's factor {diff:.2e}")
            del work
        del A, L
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

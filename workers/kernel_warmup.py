"""Compile the block's GPU kernels before block 0, while the driver still prepares the job.

A fresh GPU node has no Triton cache: the first block would pay for compiling the Hessian, fused GPTQ
and dequant-GEMM kernels (specialised per shape and config) and for creating the CUDA libraries'
handles (cuBLAS, cuSOLVER's Cholesky). `warm_up` runs each kernel once on random data of every
distinct linear shape the job quantizes, through the same solver calls a block makes, so the
compiled kernels are in the process's cache when block 0 starts. Nothing it computes is kept.
"""

from __future__ import annotations

import contextlib
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import structlog
import torch
from torch import nn

from rayquant.kernels.dequant_gemm import dequant_gemm
from rayquant.kernels.validation import validate_packed_layer
from rayquant.solver.gptq import GPTQConfig, dequantize, solve_input_group
from rayquant.solver.hessian import accumulate_hessian, mirror_upper
from rayquant.solver.pack import pack_linear
from rayquant.solver.rtn import quantize_rtn
from rayquant.storage.safetensors_reader import TensorInfo
from rayquant.workers.adapter import ROUTER_NAMES, DecoderLayout, quantizable_linears
from rayquant.workers.layer_overrides import LayerOverride, layer_config

log = structlog.get_logger()

WARMUP_TOKENS = 256  # enough rows for a damped, positive definite Hessian at any width
# devices whose workers warm up while they join (the CPU has nothing to compile; tests add it to run the path)
WARMUP_DEVICES = ("cuda",)


@dataclass(frozen=True)
class LinearShape:
    out_features: int
    in_features: int
    cfg: GPTQConfig


def distinct_shapes(linears: list[tuple[int, int, GPTQConfig | None]]) -> list[LinearShape]:
    """One entry per (out, in, config) among the job's quantized linears (config None: not quantized)."""
    seen = dict.fromkeys(LinearShape(n, k, cfg) for n, k, cfg in linears if cfg is not None)
    return list(seen)


def job_shapes(blocks: nn.ModuleList, layout: DecoderLayout, gptq: GPTQConfig,
               overrides: tuple[LayerOverride, ...]) -> list[LinearShape]:
    """The distinct shapes and configs of every linear the job quantizes (a meta skeleton is enough)."""
    linears = []
    for b, block in enumerate(blocks):
        for name in quantizable_linears(block):
            mod = block.get_submodule(name)
            linears.append((mod.out_features, mod.in_features, layer_config(layout.block_prefix(b) + name, gptq,
                                                                             overrides)))
    return distinct_shapes(linears)


# a weight of block <n>: "<blocks path>.<n>.<module path>.weight" (checkpoint names, experts one linear each)
_BLOCK_WEIGHT = re.compile(r"^(?P<blocks>.+?)\.(?P<block>\d+)\.(?P<module>.+)\.weight$")


def header_shapes(tensors: dict[str, TensorInfo], gptq: GPTQConfig,
                  overrides: tuple[LayerOverride, ...]) -> list[LinearShape]:
    """job_shapes from the source's safetensors headers alone: every 2-D weight of a numbered block but a
    router's. Known before the model's skeleton exists, so the kernels compile while it is built; a shape
    it misses is compiled by block 0 itself (tests compare it with job_shapes for every family)."""
    linears = []
    for name, info in tensors.items():
        found = _BLOCK_WEIGHT.match(name)
        if found is None or len(info.shape) != 2 or found["module"].rpartition(".")[2] in ROUTER_NAMES:
            continue
        linears.append((info.shape[0], info.shape[1], layer_config(name.removesuffix(".weight"), gptq, overrides)))
    return distinct_shapes(linears)


def warm_up(shapes: list[LinearShape], device: torch.device, dtype: torch.dtype, hessian_dtype: torch.dtype,
            validate_tokens: int) -> int:
    """Run collect's, solve's, the baseline's and validation's kernels once per shape; returns the shapes run."""
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():  # a thread's own
        _warm_up(shapes, device, dtype, hessian_dtype, validate_tokens)
    return len(shapes)


def _warm_up(shapes: list[LinearShape], device: torch.device, dtype: torch.dtype, hessian_dtype: torch.dtype,
             validate_tokens: int) -> None:
    gen = torch.Generator(device=device).manual_seed(0)
    for shape in shapes:
        k = shape.in_features
        x = torch.randn(WARMUP_TOKENS, k, generator=gen, device=device).to(dtype)
        hessian = torch.zeros(k, k, dtype=hessian_dtype, device=device)
        n_tokens = accumulate_hessian(hessian, x, mirror=False)
        mirror_upper(hessian)
        w = torch.randn(shape.out_features, k, generator=gen, device=device)
        result = solve_input_group([w], hessian, n_tokens, shape.cfg)[0]
        quantize_rtn(w, hessian, n_tokens, shape.cfg)
        packed = pack_linear(result, shape.cfg.bits)
        expected = dequantize(result.codes, result.scales, result.zeros, result.g_idx)
        validate_packed_layer(x[:validate_tokens], packed, shape.cfg.bits, expected, tolerance=float("inf"),
                              gemm=dequant_gemm)
        del x, hessian, w, result, packed, expected
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()  # block 0 starts from the memory it would have had


def start_warm_up(shapes: list[LinearShape], device: torch.device, dtype: torch.dtype, hessian_dtype: torch.dtype,
                  validate_tokens: int) -> Future:
    """warm_up on a thread of its own; the caller waits on the future before block 0."""
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="kernel-warmup")
    future = pool.submit(_timed_warm_up, shapes, device, dtype, hessian_dtype, validate_tokens)
    pool.shutdown(wait=False)
    return future


def finish_warm_up(future: Future) -> None:
    """Wait for the warm-up. A failed one (e.g. out of memory beside the embedding) is only logged:
    block 0 then compiles what it needs itself."""
    try:
        shapes, seconds = future.result()
        log.info("kernels_warm", shapes=shapes, seconds=round(seconds, 2))
    except Exception as err:  # noqa: BLE001  the job does not depend on it
        log.warning("kernel_warmup_failed", error=f"{type(err).__name__}: {err}")


def _timed_warm_up(*args) -> tuple[int, float]:
    t = time.perf_counter()
    shapes = warm_up(*args)
    return shapes, time.perf_counter() - t

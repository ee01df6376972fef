"""Scaling of the block pipeline over W workers: one process per GPU (NCCL) or per CPU (Gloo).

    python -m tests.bench.scaling_bench --preset llama-70b --workers 1,2 [--blocks 2]
    python -m tests.bench.scaling_bench --preset llama-tiny --workers 1,2,4 --cpu --samples 32 --seq-len 256
    ... --no-split-rows: each input group solved by its owner alone (workers/row_split.py off)

Ray cannot travel to the GPU machine, so each rank is a spawned process running the same
BlockWorker the Ray actors run. For every W it prints the last block's per-stage seconds (slowest
rank), the bytes that crossed between workers per stage, peak GPU memory, the scaling efficiency
T(1) / (W · T(W)), and the largest relative difference of any layer's loss from W = 1.
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import asdict

import torch

from rayquant.solver.gptq import GPTQConfig
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup
from tests.spawned_ranks import run_ranks

STAGES = ("load", "collect", "reduce", "solve", "validate", "share", "advance")
MOVED = ("load", "reduce", "share")


def _rank_main(rank: int, rendezvous: str, queue, world: int, args: argparse.Namespace) -> None:
    samples = torch.randint(2, 1024, (args.samples, args.seq_len), generator=torch.Generator().manual_seed(0))
    device = "cpu" if args.cpu else f"cuda:{rank}"
    setup = WorkerSetup(job_id="scale", rank=rank, world_size=world, model_path=f"synthetic://{args.preset}",
                        gptq=GPTQConfig(bits=4, group_size=128),
                        true_sequential=True, micro_batch=args.micro_batch,
                        num_threads=1 if args.cpu else 4, device=device, split_rows=not args.no_split_rows)
    worker = BlockWorker(setup)
    worker.start(rendezvous, samples.tensor_split(world)[rank].clone())
    out = []
    for b in range(args.blocks):
        t = time.perf_counter()
        r = worker.run_block(BlockTask("scale", b))
        out.append(dict(seconds=r.seconds, wall=time.perf_counter() - t, moved=r.bytes_received, rows=r.rows_solved,
                        peak=r.peak_memory_bytes, layers=[asdict(x) for x in r.layers]))
    worker.stop()
    queue.put((rank, out))


def run_world(world: int, args: argparse.Namespace) -> list[list[dict]]:
    return run_ranks(_rank_main, world, world, args, timeout=args.timeout)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-70b")
    parser.add_argument("--workers", default="1,2")
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--timeout", type=float, default=540)
    parser.add_argument("--no-split-rows", action="store_true", help="owners solve whole input groups")
    args = parser.parse_args()
    os.environ.setdefault("RAYQUANT_CACHE", "/tmp/rayquant-cache")
    rows = {}
    for w in [int(x) for x in args.workers.split(",")]:
        rows[w] = run_world(w, args)
    where = "CPU (Gloo)" if args.cpu else f"{torch.cuda.get_device_name()} (NCCL)"
    split = "owner solves" if args.no_split_rows else "rows split"
    print(f"\n{args.preset}, {args.samples} x {args.seq_len} tokens, 4-bit g128, {where}, {split}; "
          f"last block of {args.blocks}")
    print(f"{'W':>2} " + " ".join(f"{s:>9}" for s in STAGES) + f" {'block s':>8} {'eff':>5}  MiB moved "
          + "/".join(MOVED) + "  peak GiB  max loss diff vs W=1  rows solved per rank")
    base_t = base_layers = None
    model_lines = []
    for w, ranks in rows.items():
        last = [r[-1] for r in ranks]
        sec = {s: max(x["seconds"].get(s, 0.0) for x in last) for s in STAGES}
        block_s = sum(sec.values())
        moved = {k: sum(x["moved"].get(k, 0) for x in last) / 2**20 for k in MOVED}
        layers = {lay["name"]: lay["gptq_loss"] for x in last for lay in x["layers"]}
        base_t = base_t or block_s
        base_layers = base_layers or layers
        diff = max(abs(layers[n] - base_layers[n]) / base_layers[n] for n in layers)
        print(f"{w:>2} " + " ".join(f"{sec[s]:9.3f}" for s in STAGES) + f" {block_s:8.2f} {base_t / (w * block_s):5.2f}"
              f"  {moved['load']:.1f}/{moved['reduce']:.1f}/{moved['share']:.1f}"
              f"  {max(x['peak'] for x in last) / 2**30:8.1f}  {diff:.2e}  {'/'.join(str(x['rows']) for x in last)}")
        model = predicted_bytes([lay for x in last for lay in x["layers"]], w, hessian_bytes=8 if args.cpu else 4)
        model_lines.append(f"{w:>2}  " + "  ".join(f"{k} {model[k] / 2**20:.2f} / {moved[k]:.2f}" for k in MOVED))
    print("\ncommunication model (MiB per block, predicted from the linears' shapes / measured; the measured load "
          "also carries the norms, reduce and share the token counts and merged reports)")
    print("\n".join(model_lines))


def predicted_bytes(layers: list[dict], world: int, hessian_bytes: int, bits: int = 4, group: int = 128) -> dict[str, int]:
    """Bytes received by all ranks together in one block, per stage, for bf16 source weights:
    load: every linear's weight is read by one rank and broadcast to W-1 others;
    reduce: every input group's Hessian [K, K] (fp32 on GPUs, fp64 on CPU workers) gathered on an owner (W-1
    copies) or, for groups whose rows are split over all ranks (owner -1), gathered and broadcast back in
    chunks (2 (W-1) copies);
    share: every packed layer (qweight, qzeros, scales, g_idx) broadcast to W-1 ranks."""
    others = world - 1
    hessians: dict[str, tuple[int, bool]] = {}
    load = share = 0
    for lay in layers:
        K, N = lay["in_features"], lay["out_features"]
        load += others * N * K * 2
        G = -(-K // group)
        share += others * (K * N * bits // 8 + G * N * bits // 8 + G * N * 2 + K * 4)
        hessians[lay["input_group"]] = (K, lay["owner"] == -1)
    reduce = sum(others * (2 if split else 1) * hessian_bytes * K * K for K, split in hessians.values())
    return {"load": load, "reduce": reduce, "share": share}


if __name__ == "__main__":
    main()

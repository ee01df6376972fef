"""Row-split solves: slice boundaries, packed slices that concatenate to the whole packed layer, and
the tiny Llama on 1, 2 and 4 spawned Gloo workers (BlockWorker as the Ray actors run it)."""

from __future__ import annotations

import dataclasses
import socket
from dataclasses import asdict

import pytest
import torch

from rayquant.solver.gptq import GPTQConfig, GPTQResult
from rayquant.solver.grid import max_level
from rayquant.solver.pack import PackedLinear, pack_linear
from rayquant.solver.pack import PACKED_FIELDS
from rayquant.workers.block_worker import BlockTask, BlockWorker, WorkerSetup
from rayquant.solver.pack import concat_packed
from rayquant.workers.row_split import ROW_ALIGN, row_bounds
from tests.spawned_ranks import run_ranks


@pytest.mark.parametrize("n_rows", [0, 8, 31, 32, 64, 100, 128, 1024, 14336, 53248 + 8])
@pytest.mark.parametrize("world", [1, 2, 3, 4, 8])
def test_row_bounds_cover_every_row_once_in_aligned_near_equal_slices(n_rows: int, world: int) -> None:
    bounds = row_bounds(n_rows, world)
    assert len(bounds) == world + 1 and bounds[0] == 0 and bounds[-1] == n_rows
    assert all(a <= b for a, b in zip(bounds, bounds[1:]))
    assert all(b % ROW_ALIGN == 0 for b in bounds[:-1])
    units = [(b - a) // ROW_ALIGN for a, b in zip(bounds, bounds[1:])]
    assert max(units) - min(units) <= 1  # whole units of 32 rows, as equal as they go
    assert bounds[-1] - bounds[-2] - units[-1] * ROW_ALIGN == n_rows % ROW_ALIGN  # the tail: last rank


def test_row_bounds_of_a_small_layer_leave_some_ranks_without_rows() -> None:
    assert row_bounds(64, 4) == [0, 0, 32, 32, 64]
    assert row_bounds(1024, 3) == [0, 320, 672, 1024]


def _random_result(n_rows: int, k: int, bits: int, group_size: int, seed: int) -> GPTQResult:
    gen = torch.Generator().manual_seed(seed)
    groups = k // group_size
    return GPTQResult(
        codes=torch.randint(0, max_level(bits) + 1, (n_rows, k), generator=gen, dtype=torch.uint8),
        scales=torch.rand(groups, n_rows, generator=gen) + 0.01,
        zeros=torch.randint(1, max_level(bits) + 1, (groups, n_rows), generator=gen, dtype=torch.int32),
        g_idx=(torch.arange(k) // group_size).to(torch.int32)[torch.randperm(k, generator=gen)],
        loss=0.0, damp_percent=0.01)


def _rows(result: GPTQResult, start: int, stop: int) -> GPTQResult:
    return GPTQResult(codes=result.codes[start:stop], scales=result.scales[:, start:stop],
                      zeros=result.zeros[:, start:stop], g_idx=result.g_idx, loss=0.0, damp_percent=0.01)


@pytest.mark.parametrize("bits,n_rows", [(2, 224), (3, 224), (4, 224), (8, 224), (4, 232), (8, 232), (3, 96)])
@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_packed_row_slices_concatenated_equal_packing_all_rows(bits: int, n_rows: int, world: int) -> None:
    whole = _random_result(n_rows, 64, bits, 32, seed=bits * 1000 + n_rows)
    bounds = row_bounds(n_rows, world)
    slices = [pack_linear(_rows(whole, a, b), bits) for a, b in zip(bounds, bounds[1:]) if b > a]
    assert len(slices) > 1  # really split
    joined, expected = concat_packed(slices), pack_linear(whole, bits)
    for f in PACKED_FIELDS:
        got, want = getattr(joined, f), getattr(expected, f)
        assert got.dtype == want.dtype and torch.equal(got, want), f


# ---- the tiny Llama over spawned workers ------------------------------------------------------------

BLOCKS = 2


def _setup(rank: int, world: int, split_rows: bool = True) -> WorkerSetup:
    return WorkerSetup(job_id="rows", rank=rank, world_size=world, model_path="synthetic://llama-tiny",
                       gptq=GPTQConfig(bits=4, group_size=128), true_sequential=True, micro_batch=2,
                       split_rows=split_rows)


def _shard(rank: int, world: int) -> torch.Tensor:
    samples = torch.randint(2, 1024, (8, 64), generator=torch.Generator().manual_seed(0))
    return samples.tensor_split(world)[rank].clone()


def _solve_blocks(worker: BlockWorker, rendezvous: str, samples: torch.Tensor, out: list[dict]) -> None:
    """Per block into `out`: reports, rows solved, bytes received, seconds, rank 0's part tensor shapes."""
    try:
        worker.start(rendezvous, samples)
        for b in range(BLOCKS):
            r = worker.run_block(BlockTask("rows", b))
            out.append(dict(layers=[asdict(x) for x in r.layers], rows=r.rows_solved, moved=r.bytes_received,
                            seconds=r.seconds,  # rank 0's part: shapes only (no tensors through the queue)
                            tensors=None if r.tensors is None else {k: (tuple(v.shape), str(v.dtype))
                                                                    for k, v in r.tensors.items()}))
    finally:
        worker.stop()


def _rank_main(rank: int, rendezvous: str, queue, world: int, owners_rendezvous: str | None) -> None:
    """One rank with split rows; with `owners_rendezvous`, the same ranks then once more without split
    rows (a second process group: each spawned rank imports torch once for both runs)."""
    runs = {True: [], False: []}
    try:
        _solve_blocks(BlockWorker(_setup(rank, world)), rendezvous, _shard(rank, world), runs[True])
        if owners_rendezvous is not None:
            _solve_blocks(BlockWorker(_setup(rank, world, split_rows=False)), owners_rendezvous, _shard(rank, world),
                          runs[False])
    finally:
        queue.put((rank, runs))


def _free_address() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"tcp://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture(scope="module")
def runs() -> dict[tuple[int, bool], list[list[dict]]]:
    """(world, split_rows) -> per rank, per block: what _solve_blocks records. One worker runs in this process."""
    one: list[dict] = []
    _solve_blocks(BlockWorker(_setup(0, 1)), _free_address(), _shard(0, 1), one)
    two = run_ranks(_rank_main, 2, 2, _free_address())
    four = run_ranks(_rank_main, 4, 4, None)
    return {(1, True): [one], (2, True): [r[True] for r in two], (2, False): [r[False] for r in two],
            (4, True): [r[True] for r in four]}


def _layers(ranks: list[list[dict]]) -> dict[str, dict]:
    reports = [x for blocks in ranks for block in blocks for x in block["layers"]]
    by_name = {x["name"]: x for x in reports}
    assert len(by_name) == len(reports) == BLOCKS * 7  # exactly one report per linear
    return by_name


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_split_rows_on_every_rank_give_losses_within_half_a_percent_of_one_worker(runs, world: int) -> None:
    one, many = _layers(runs[(1, True)]), _layers(runs[(world, True)])
    assert set(one) == set(many)
    for name, a in one.items():
        b = many[name]
        assert b["owner"] == -1, name  # one group per true_sequential stage < W: rows split
        assert (b["in_features"], b["out_features"], b["n_tokens"]) == (a["in_features"], a["out_features"],
                                                                       a["n_tokens"])
        assert abs(b["gptq_loss"] - a["gptq_loss"]) <= 0.005 * a["gptq_loss"], name
        assert abs(b["rtn_loss"] - a["rtn_loss"]) <= 0.005 * a["rtn_loss"], name
        assert b["damp_percent"] == a["damp_percent"] and 0 < b["mean_rel_err"] <= b["max_rel_err"] < 1e-3
    for b in range(BLOCKS):
        rows = [blocks[b]["rows"] for blocks in runs[(world, True)]]
        assert all(n > 0 for n in rows), rows  # every rank solved some rows of the block
        assert sum(rows) == runs[(1, True)][0][b]["rows"]  # and every row was solved once
        assert all(blocks[b]["moved"]["reduce"] > 0 and blocks[b]["moved"]["share"] > 0
                   for blocks in runs[(world, True)])
        assert all(blocks[b]["tensors"] is None for blocks in runs[(world, True)][1:])
        assert runs[(world, True)][0][b]["tensors"] == runs[(1, True)][0][b]["tensors"]  # names, shapes, dtypes


@pytest.mark.slow
def test_without_split_rows_owners_solve_whole_groups_with_the_same_losses(runs) -> None:
    split, owners = _layers(runs[(2, True)]), _layers(runs[(2, False)])
    assert {x["owner"] for x in owners.values()} == {0, 1}
    for name, a in owners.items():
        assert abs(split[name]["gptq_loss"] - a["gptq_loss"]) <= 0.005 * a["gptq_loss"], name
    per_rank = [blocks[0]["rows"] for blocks in runs[(2, False)]]
    assert sum(per_rank) == runs[(1, True)][0][0]["rows"]  # each group solved by its owner only


class CorruptSliceWorker(BlockWorker):
    """Rank 1 packs its slice of gate_proj (rows 128-255 of 256 at W = 2) with a doubled scale."""

    def _pack(self, results: list[GPTQResult], bits: int) -> list[PackedLinear]:
        return [self._corrupt(result, packed) for result, packed in zip(results, super()._pack(results, bits))]

    def _corrupt(self, result: GPTQResult, packed: PackedLinear) -> PackedLinear:
        if self.rank == 1 and result.codes.shape == (128, 128):  # only gate/up slices have this shape
            scales = packed.scales.clone()
            scales[0, :4] *= 2
            packed = dataclasses.replace(packed, scales=scales)
        return packed


def _corrupt_rank_main(rank: int, rendezvous: str, queue) -> None:
    worker = CorruptSliceWorker(_setup(rank, 2))
    try:
        worker.start(rendezvous, _shard(rank, 2))
        worker.run_block(BlockTask("rows", 0))
        outcome = ("finished", "")
    except Exception as e:  # noqa: BLE001 - what each rank raised is the result
        outcome = (type(e).__name__, str(e))
    finally:
        worker.stop()
    queue.put((rank, outcome))


def test_a_slice_that_fails_validation_fails_on_its_rank_naming_the_layer_and_stops_the_other():
    rank0, rank1 = run_ranks(_corrupt_rank_main, 2)
    assert rank1[0] == "KernelMismatch" and "block 0 layer model.layers.0.mlp.gate_proj" in rank1[1]
    assert rank0[0] == "PeerFailed"  # its own slice was fine; it learns of rank 1's failure, no hang

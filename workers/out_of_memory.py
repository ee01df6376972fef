"""A worker that runs out of device memory says where, how much it asked for, and what to change.

torch's own error is a traceback ending in allocator advice; the user's question is which block and stage,
and whether more workers or fewer calibration windows would fit. The job's durable blocks stay: the same
command resumes after the last of them.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable
from typing import Any

import torch

GIB = 2**30
_ASKED = re.compile(r"Tried to allocate [\d.]+ \w+")


class DeviceOutOfMemory(RuntimeError):
    """A rank's device had no memory left for a step of the job."""


def describe(err: BaseException, rank: int, device: torch.device, where: str) -> DeviceOutOfMemory:
    """DeviceOutOfMemory for `err` (torch.OutOfMemoryError) on `rank` while `where` ran."""
    asked = _ASKED.search(str(err))
    details = ["t" + asked.group(0)[1:] if asked else "an allocation failed"]
    if device.type == "cuda":
        try:
            _, total = torch.cuda.mem_get_info(device)
            details.append(f"{torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated of the GPU's "
                           f"{total / GIB:.1f} GiB")
        except Exception:  # noqa: BLE001 - a device in a failed state: the error without the figures
            pass
    kind = "GPU" if device.type == "cuda" else "device"
    return DeviceOutOfMemory(
        f"worker rank {rank} ran out of {kind} memory in {where} ({'; '.join(details)}). `rayquant plan SPEC` "
        "estimates each worker's memory: spread the job over more GPUs (cluster.num_workers) or lower "
        "calibration.n_samples, then run the same command again: the job resumes after its last durable block")


def names_out_of_memory(where: str | None = None) -> Callable:
    """Decorate a BlockWorker method so that torch.OutOfMemoryError leaves it as DeviceOutOfMemory, naming
    `where` (None: the block and stage the worker's clock is in)."""
    def decorate(method: Callable) -> Callable:
        @functools.wraps(method)
        def wrapper(self, *args: Any, **kwargs: Any) -> Any:
            try:
                return method(self, *args, **kwargs)
            except torch.OutOfMemoryError as err:
                block, stage = self.clock.now
                place = where or (f"block {block}, stage {stage}" if block is not None else stage)
                raise describe(err, self.rank, self.device, place) from None
        return wrapper
    return decorate

"""Named points where a test kills a worker's process, each once per job: the fault-injection test's hook.

`RAYQUANT_FAILPOINTS="1:2:collect,0:-:join"` (rank:block:point, `-` = no block) with
`RAYQUANT_FAILPOINT_DIR` naming a directory: the first process of that rank to reach that point creates a
file there (exclusively) and SIGKILLs itself, so the restarted worker passes the same point. A fourth
field `oom` (`1:2:solve:oom`) raises torch.OutOfMemoryError there instead, as a GPU that is too small
would. Unset (every real job), `reach` is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAILPOINTS_VAR = "RAYQUANT_FAILPOINTS"
FAILPOINT_DIR_VAR = "RAYQUANT_FAILPOINT_DIR"


def parse(value: str) -> dict[tuple[int, int | None, str], str]:
    """"rank:block:point[:oom],..." → {(rank, block or None, point): "kill" or "oom"}."""
    points = {}
    for item in filter(None, (x.strip() for x in value.split(","))):
        rank, block, point, *action = item.split(":")
        points[(int(rank), None if block == "-" else int(block), point)] = action[0] if action else "kill"
    return points


_POINTS = parse(os.environ.get(FAILPOINTS_VAR, ""))


def reach(rank: int, block: int | None, point: str) -> None:
    """Die here (SIGKILL, as the OOM killer or a lost node would), or raise torch.OutOfMemoryError, if a
    test armed this point and no earlier process of this rank fired it."""
    action = _POINTS.get((rank, block, point))
    if action is None:
        return
    fired = Path(os.environ[FAILPOINT_DIR_VAR]) / f"{rank}-{'-' if block is None else block}-{point}"
    try:
        os.close(os.open(fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    if action == "oom":
        import torch  # the worker's process has it already

        raise torch.OutOfMemoryError(f"out of memory (failpoint {fired.name}). Tried to allocate 1.00 GiB.")
    os.kill(os.getpid(), signal.SIGKILL)

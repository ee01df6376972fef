"""Named points where a test kills a worker's process, each once per job: the fault-injection test's hook.

`RAYQUANT_FAILPOINTS="1:2:collect,0:-:join"` (rank:block:point, `-` = no block) with
`RAYQUANT_FAILPOINT_DIR` naming a directory: the first process of that rank to reach that point creates a
file there (exclusively) and SIGKILLs itself, so the restarted worker passes the same point. Unset (every
real job), `reach` is one dict lookup.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

FAILPOINTS_VAR = "RAYQUANT_FAILPOINTS"
FAILPOINT_DIR_VAR = "RAYQUANT_FAILPOINT_DIR"


def parse(value: str) -> frozenset[tuple[int, int | None, str]]:
    """"rank:block:point,..." → {(rank, block or None, point)}."""
    points = set()
    for item in filter(None, (x.strip() for x in value.split(","))):
        rank, block, point = item.split(":")
        points.add((int(rank), None if block == "-" else int(block), point))
    return frozenset(points)


_POINTS = parse(os.environ.get(FAILPOINTS_VAR, ""))


def reach(rank: int, block: int | None, point: str) -> None:
    """Die here (SIGKILL, as the OOM killer or a lost node would) if a test armed this point and no
    earlier process of this rank died at it."""
    if (rank, block, point) not in _POINTS:
        return
    fired = Path(os.environ[FAILPOINT_DIR_VAR]) / f"{rank}-{'-' if block is None else block}-{point}"
    try:
        os.close(os.open(fired, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    os.kill(os.getpid(), signal.SIGKILL)

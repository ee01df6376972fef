"""SIGTERM ends a job as Ctrl-C does: Kubernetes, `ray job stop` and `kill` send it, and the driver must
still kill its workers, shut down its Ray and leave the job resumable, then print its one line."""

from __future__ import annotations

import signal
import threading
from types import FrameType


def install_sigterm_handler() -> bool:
    """Make the first SIGTERM raise KeyboardInterrupt in the main thread; later ones are ignored while
    the interrupted job cleans up (SIGKILL still ends it). Returns False off the main thread, where
    Python cannot install handlers (the caller's thread is then not the job's)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(signal.SIGTERM, _interrupt)
    return True


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # cleanup runs once, not interrupted again
    raise KeyboardInterrupt(f"signal {signum}")

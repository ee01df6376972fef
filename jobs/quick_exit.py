"""Leave the process without the interpreter's teardown once the command's work is done.

Python's exit unloads every module one by one after the atexit functions: with torch, transformers and
Ray loaded that costs 1.2 s on a 2-core CPU and 1.2-1.5 s after an 8B job on an H100
(tests/bench/job_bench.py's "exit after job_done"), time a user waits for nothing: by then the job's
files are closed and fsynced and Ray is shut down. The atexit functions still run (weakref finalizers
such as temporary directories', Ray's own), stdout and stderr are flushed; a thread that is not a daemon
still running keeps the ordinary exit, which waits for it.
"""

from __future__ import annotations

import atexit
import os
import sys
import threading
from typing import NoReturn


def exit_without_teardown(code: int) -> NoReturn:
    """Exit with `code` as `sys.exit` would, minus the modules' teardown (see the module docstring)."""
    if _threads_still_working():
        sys.exit(code)
    atexit._run_exitfuncs()  # noqa: SLF001 - what sys.exit runs before the teardown that os._exit skips
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe: nothing more can reach it either way
            pass
    os._exit(code)


def _threads_still_working() -> bool:
    main = threading.main_thread()
    return any(t is not main and not t.daemon and t.is_alive() for t in threading.enumerate())

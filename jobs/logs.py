"""Where log lines go and how they look: human lines on a terminal, one JSON object per line otherwise.

stdout carries only a command's result (the output URI, eval's JSON); every log line goes to stderr.
On a terminal the lines are printed above the job's progress bar (tqdm.write keeps the bar in place);
off a terminal (a file, a pipe, a log shipper) each event is one JSON object with an ISO timestamp.
Ray workers configure themselves when their actor starts (jobs/cluster.py): their stderr is a Ray log
file, so they write JSON, and their lines reach the user's stderr only with `-v`.
"""

from __future__ import annotations

import logging
import sys

import structlog

def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()


def configure_logging(verbose: bool, terminal: bool | None = None) -> None:
    """Structured logs to stderr: console lines on a terminal, JSON lines otherwise."""
    terminal = stderr_is_terminal() if terminal is None else terminal
    if terminal:
        tail = [structlog.processors.TimeStamper(fmt="%H:%M:%S"), structlog.dev.ConsoleRenderer(colors=True)]
    else:
        tail = [structlog.processors.TimeStamper(fmt="iso", utc=True), structlog.processors.dict_tracebacks,
                structlog.processors.JSONRenderer(sort_keys=False)]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, structlog.processors.add_log_level, *tail],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=lambda *_: _StderrLogger(),
        cache_logger_on_first_use=False,
    )


class _StderrLogger:
    """Writes each line to sys.stderr as it is at that moment (a caller may have replaced it since),
    through tqdm so that a progress bar on the terminal stays below the lines."""

    def msg(self, message: str) -> None:
        if "tqdm" in sys.modules:  # a bar may be showing: tqdm clears it, prints, redraws it
            sys.modules["tqdm"].tqdm.write(message, file=sys.stderr)
            sys.stderr.flush()
        else:
            print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


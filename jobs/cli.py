"""`rayquant` command line. Exit codes: 0 success, 2 bad input (spec, model, data), 1 otherwise."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import structlog

from rayquant.jobs.input_errors import INPUT_ERRORS
from rayquant.jobs.spec import load_spec
from rayquant.kernels.validation import KernelMismatch


def configure_logging(verbose: bool) -> None:
    """Structured logs to stderr (stdout carries only the result URI)."""
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="%H:%M:%S"),
            structlog.dev.ConsoleRenderer(colors=False),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG if verbose else logging.INFO),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )


def configure_worker_logging() -> None:
    """Ray's worker_process_setup_hook: the same stderr logs in every worker process."""
    configure_logging(os.environ.get("RAYQUANT_VERBOSE") == "1")


def _quantize(args: argparse.Namespace) -> int:
    from rayquant.jobs.driver import run_job  # imports ray; keep `--help` fast

    spec = load_spec(Path(args.spec), args.set or [])
    outcome = run_job(spec)
    print(Path(outcome.uri).resolve() if "://" not in outcome.uri else outcome.uri)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayquant", description="Distributed GPTQ quantization on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-layer debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="run a job here (embedded Ray) or on cluster.address")
    q.add_argument("spec", help="job spec YAML, e.g. jobs/specs/tiny-llama.yaml")
    q.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if args.verbose:
        os.environ["RAYQUANT_VERBOSE"] = "1"
    # Embedded Ray binds to loopback only, so nothing listens on a routable address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return _quantize(args)
    except INPUT_ERRORS as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    except KernelMismatch as err:
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume after the last completed block", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

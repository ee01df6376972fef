"""`rayquant` command line. Exit codes: 0 success, 2 bad input (spec, model, data), 1 otherwise."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import structlog

from rayquant.jobs.input_errors import INPUT_ERRORS
from rayquant.jobs.spec import CalibrationSpec, SpecError, load_spec
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
        logger_factory=lambda *_: _StderrLogger(),
    )


class _StderrLogger:
    """Writes each line to sys.stderr as it is at that moment (a caller may have replaced it since)."""

    def msg(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    log = debug = info = warn = warning = error = err = critical = exception = fatal = failure = msg


def configure_worker_logging() -> None:
    """Ray's worker_process_setup_hook: the same stderr logs in every worker process."""
    configure_logging(os.environ.get("RAYQUANT_VERBOSE") == "1")


def _quantize(args: argparse.Namespace) -> int:
    from rayquant.jobs.driver import run_job  # imports ray; keep `--help` fast

    spec = load_spec(Path(args.spec), args.set or [])
    outcome = run_job(spec)
    print(Path(outcome.uri).resolve() if "://" not in outcome.uri else outcome.uri)
    return 0


def _eval(args: argparse.Namespace) -> int:
    import json
    import time

    from rayquant.storage.calibration import TokenizerNotFound, load_calibration, vocab_size_of, windows_sha256
    from rayquant.storage.gptq_checkpoint import open_gptq_checkpoint
    from rayquant.workers.checkpoint_eval import evaluate_perplexity, load_dequantized_model

    for flag, value, least in (("--seq-len", args.seq_len, 8), ("--eval-samples", args.eval_samples, 1),
                               ("--micro-batch", args.micro_batch, 1)):
        if value < least:
            raise SpecError(f"{flag}={value}: use at least {least}")
    start = time.perf_counter()
    checkpoint = open_gptq_checkpoint(args.uri)
    tokenizer_dir = Path(args.tokenizer) if args.tokenizer else checkpoint.source.path
    # the job's own call: the same data settings give the same held-out eval windows (they do not
    # depend on n_samples or the seed, which only place calibration windows: one is cut, unused)
    try:
        calib = load_calibration(args.data, tokenizer_dir, 1, args.seq_len, args.eval_samples, args.seed,
                                 packing=args.packing, min_length=args.min_length, text_field=args.text_field,
                                 split=args.split, vocab_size=vocab_size_of(checkpoint.source.config))
    except TokenizerNotFound as err:
        raise TokenizerNotFound(f"{err}; or pass --tokenizer DIR (the source model's directory)") from err
    model = load_dequantized_model(checkpoint, device=args.device)
    result = evaluate_perplexity(model, calib.eval_samples, args.micro_batch)
    print(json.dumps({
        "uri": args.uri, "ppl": result.ppl, "n_tokens": result.n_tokens,
        "windows_sha256": windows_sha256(calib.eval_samples),
        "eval_samples": len(calib.eval_samples), "seq_len": args.seq_len, "dataset": args.data,
        "quantized_linears": len(checkpoint.linears), "seconds": round(time.perf_counter() - start, 3),
    }, sort_keys=True))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rayquant", description="Distributed GPTQ quantization on Ray")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-layer debug logs")
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="run a job here (embedded Ray) or on cluster.address")
    q.add_argument("spec", help="job spec YAML, e.g. jobs/specs/tiny-llama.yaml")
    q.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field")
    e = sub.add_parser("eval", help="perplexity of a GPTQ v1 checkpoint (any tool's) or an unquantized model")
    e.add_argument("uri", help="checkpoint or model directory, or synthetic://<preset>")
    calibration = CalibrationSpec()  # defaults of the job spec: the same eval windows as a default job
    e.add_argument("--data", default=calibration.dataset, help="dataset, as calibration.dataset")
    e.add_argument("--seq-len", type=int, default=calibration.seq_len, help="tokens per window")
    e.add_argument("--eval-samples", type=int, default=calibration.eval_samples, help="held-out windows")
    e.add_argument("--seed", type=int, default=calibration.seed, help="as calibration.seed")
    e.add_argument("--text-field", default=calibration.text_field, help="as calibration.text_field")
    e.add_argument("--split", default=calibration.split, help="as calibration.split")
    e.add_argument("--packing", default=calibration.packing, choices=("concat", "per_sample"),
                   help="as calibration.packing")
    e.add_argument("--min-length", type=int, default=calibration.min_length, help="as calibration.min_length")
    e.add_argument("--tokenizer", help="tokenizer directory (default: the checkpoint's own)")
    e.add_argument("--device", default="cpu", help="cpu or cuda; the forward runs in float32")
    e.add_argument("--micro-batch", type=int, default=1, help="windows per forward")
    args = parser.parse_args(argv)
    configure_logging(args.verbose)
    if args.verbose:
        os.environ["RAYQUANT_VERBOSE"] = "1"
    # Embedded Ray binds to loopback only, so nothing listens on a routable address.
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        return _eval(args) if args.command == "eval" else _quantize(args)
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

"""`rayquant` command line. Exit codes: 0 success, 2 bad input (spec, model, data, cluster address or token,
job id), 1 otherwise.

Imports stay light at the top (argparse, the spec's pydantic models) so `--help` and `--version` answer
at once; `quantize` starts Ray while another thread imports torch, transformers and the driver.
`submit | status | logs | stop | list` talk to a cluster's Jobs API (jobs/submission.py).
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path
from typing import NoReturn

# huggingface_hub reads this once, at import: its upload bars would break stderr's one JSON object per line
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

from rayquant.jobs.logs import configure_logging  # noqa: E402
from rayquant.jobs.plan import add_plan_parser  # noqa: E402
from rayquant.jobs.quick_exit import exit_without_teardown  # noqa: E402
from rayquant.jobs.reconcile import add_reconcile_parser  # noqa: E402
from rayquant.jobs.spec import CalibrationSpec, SpecError, load_spec  # noqa: E402

EXAMPLE_SPEC = Path(__file__).parent / "specs" / "example.yaml"

QUANTIZE_EPILOG = """\
spec sections (every key has a default; `rayquant example-spec` prints them all, annotated):
  name          the job's name (model card, progress bar)
  model         source: a local model directory, s3://bucket/prefix, hf://org/name[@revision] or
                synthetic://<preset>; trust_remote_code (must be false)
  quant         bits, group_size, desc_act, sym, act_group_aware, damp_percent, true_sequential,
                gpu_activations, overrides (per-module bits/group_size/skip), moe.{min_tokens, starved_experts}
  calibration   dataset (builtin://text | .txt/.jsonl/.parquet path or s3:// | hf://), n_samples,
                seq_len, eval_samples, packing, min_length, text_field, split, seed
  cluster       address (none = embedded Ray on 127.0.0.1), num_workers, gpus_per_worker, cpus_per_worker,
                rendezvous_timeout_s, collective_timeout_s, max_worker_restarts
  output        uri: a local directory, s3://bucket/prefix or hf://org/name[@branch] (uploaded as shards
                close, the manifest last); work_dir, shared, max_shard_bytes, verify (sizes|hashes)

S3: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION. Hub: HF_TOKEN, HF_ENDPOINT.

Run the same command again after a crash: it resumes after the last finished block.
stdout: the output directory. stderr: a progress bar on a terminal, JSON log lines otherwise.
"""

CLUSTER_EPILOG = """\
cluster address: --address, else the spec's cluster.address (submit only), else RAY_ADDRESS; the head's
  Jobs API (dashboard), e.g. http://HEAD:8265 (a ray://HEAD:10001 or HEAD:6379 address means HEAD:8265).
token: RAY_AUTH_TOKEN, else the file at RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (as Ray reads it;
  `ray get-auth-token` on the head prints it).
"""

SUBMIT_EPILOG = CLUSTER_EPILOG + """
The job runs `rayquant quantize` with this spec on the cluster's head (rayquant installed there, on PATH),
writing output.uri: a local output must be a mount every Ray node sees (output.shared: true); s3:// and
hf:// outputs need output.work_dir on such a mount. Job id = rq-<spec and source revision fingerprint>:
submitting the same work again prints the pending, running or finished job; a failed or stopped one is
submitted again (rq-...-2, -3, ...) and resumes after its last finished block.
stdout: the job id.
"""


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("rayquant")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed)"


def _quantize(args: argparse.Namespace) -> int:
    from rayquant.jobs.api import run_quantize  # Ray and the driver: only now, so --help stays light

    if args.spec is None and not args.set:
        raise SpecError("pass a job spec YAML (e.g. jobs/specs/tiny-llama.yaml, `rayquant example-spec`) or --set")
    outcome = run_quantize(load_spec(Path(args.spec) if args.spec is not None else None, args.set or []), args.verbose)
    print(Path(outcome.uri).resolve() if "://" not in outcome.uri else outcome.uri)
    return 0


def _example_spec(_args: argparse.Namespace) -> int:
    print(EXAMPLE_SPEC.read_text(encoding="utf-8"), end="")
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


def _jobs_api(args: argparse.Namespace, spec_address: str | None = None):
    """The cluster's Jobs API client, from --address, the spec's address or RAY_ADDRESS, with the token."""
    from rayquant.jobs.job_client import cluster_address, cluster_token, connect_jobs_api

    address = cluster_address(args.address, spec_address, os.environ)
    return connect_jobs_api(address, cluster_token(os.environ, Path.home()))


def _submit(args: argparse.Namespace) -> int:
    from rayquant.jobs.submission import submit_spec

    job = submit_spec(load_spec(Path(args.spec), args.set or []), args.address)
    note = "submitted" if job.new else "already submitted (the same spec and source revision)"
    print(f"{job.job_id}: {note}, {job.status}; `rayquant status {job.job_id}`", file=sys.stderr)
    print(job.job_id)
    return 0


def _status(args: argparse.Namespace) -> int:
    from rayquant.jobs.submission import job_status

    view = job_status(_jobs_api(args), args.job_id)
    print(view.to_json() if args.json else "\n".join(view.lines()))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from rayquant.jobs.submission import write_logs

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    write_logs(_jobs_api(args), args.job_id, args.follow, write)
    return 0


def _stop(args: argparse.Namespace) -> int:
    from rayquant.jobs.submission import stop_job

    status = stop_job(_jobs_api(args), args.job_id)
    print(f"{args.job_id}: {status}")
    return 0


def _list(args: argparse.Namespace) -> int:
    import json
    from dataclasses import asdict

    from rayquant.jobs.submission import list_jobs

    jobs = list_jobs(_jobs_api(args))
    if args.json:
        print(json.dumps([asdict(j) for j in jobs], sort_keys=True))
        return 0
    rows = [("JOB", "STATUS", "SPEC", "OUTPUT")] + [(j.job_id, j.status, j.spec, j.output) for j in jobs]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[3])
    return 0


def _add_cluster_commands(sub) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    s = sub.add_parser("submit", help="run a job on a Ray cluster (Jobs API); prints its id",
                       description="Submit the spec as a Ray job that runs `rayquant quantize` on the cluster.",
                       epilog=SUBMIT_EPILOG, formatter_class=fmt)
    s.add_argument("spec", help="job spec YAML, e.g. jobs/specs/tiny-llama.yaml")
    s.add_argument("--set", action="append", metavar="KEY.PATH=VALUE", help="override a spec field; repeatable")
    commands = (
        (s, _submit),
        (sub.add_parser("status", help="a job's Ray status, block i/L, stage, s/block, ETA and output",
                        epilog=CLUSTER_EPILOG, formatter_class=fmt), _status),
        (sub.add_parser("logs", help="a job's log (--follow: until it ends)", epilog=CLUSTER_EPILOG,
                        formatter_class=fmt), _logs),
        (sub.add_parser("stop", help="stop a running job (submit the same spec again to resume it)",
                        epilog=CLUSTER_EPILOG, formatter_class=fmt), _stop),
        (sub.add_parser("list", help="the cluster's rayquant jobs: id, status, spec, output", epilog=CLUSTER_EPILOG,
                        formatter_class=fmt), _list),
    )
    for parser, run in commands:
        parser.add_argument("--address", help="the cluster's Jobs API, e.g. http://HEAD:8265 (see below)")
        if run in (_status, _logs, _stop):
            parser.add_argument("job_id", metavar="ID", help="the id `rayquant submit` printed (rq-...)")
        if run in (_status, _list):
            parser.add_argument("--json", action="store_true", help="one JSON document instead of text")
        if run is _logs:
            parser.add_argument("--follow", action="store_true", help="keep printing until the job ends")
        parser.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayquant", description="Distributed GPTQ quantization on Ray",
                                     epilog="`rayquant COMMAND --help` for each command's arguments.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logs, Ray's own warnings and the workers' log lines")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    q = sub.add_parser("quantize", help="run a job here (embedded Ray) or on cluster.address",
                       description="Quantize the spec's model into its output, block by block, on Ray workers.",
                       epilog=QUANTIZE_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    q.add_argument("spec", nargs="?", help="job spec YAML, e.g. jobs/specs/tiny-llama.yaml (`rayquant example-spec`); "
                                           "may be left out when --set gives every section that differs")
    q.add_argument("--set", action="append", metavar="KEY.PATH=VALUE",
                   help="override a spec field, value read as YAML (e.g. --set quant.bits=8); repeatable")
    q.set_defaults(run=_quantize)
    x = sub.add_parser("example-spec", help="print an annotated job spec with every key at its default",
                       description="Print an annotated job spec: every key, its default and its trade-off.")
    x.set_defaults(run=_example_spec)
    e = sub.add_parser("eval", help="perplexity of a GPTQ v1 checkpoint (any tool's) or an unquantized model",
                       description="Perplexity on the held-out windows a job with the same calibration.* "
                                   "settings scores in its pass; the last stdout line is JSON.")
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
    e.set_defaults(run=_eval)
    _add_cluster_commands(sub)
    add_reconcile_parser(sub)
    add_plan_parser(sub)
    return parser


def run() -> NoReturn:
    """The `rayquant` command: `main`, then out without the interpreter's teardown (jobs/quick_exit.py)."""
    exit_without_teardown(main())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.verbose:  # every worker line, not Ray's "[repeated 7x across cluster]" summaries (read at `import ray`)
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume after the last completed block", file=sys.stderr)
        return 1
    except Exception as err:  # noqa: BLE001 - sorted into input errors (2) and the rest below
        return _report_error(err)


def _report_error(err: Exception) -> int:
    """One line on stderr for the errors a user can act on; anything else is a bug: its traceback."""
    from rayquant.jobs.job_client import ClusterAuthFailed, ClusterUnreachable, NoClusterAddress
    from rayquant.jobs.submission import JobNotFound

    # before the import below, which loads torch
    if isinstance(err, (SpecError, NoClusterAddress, ClusterUnreachable, ClusterAuthFailed, JobNotFound)):
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    from rayquant.jobs.cluster import WorkerDied
    from rayquant.jobs.input_errors import INPUT_ERRORS  # imports every module that defines one
    from rayquant.kernels.validation import KernelMismatch
    from rayquant.workers.collectives import RendezvousTimeout
    from rayquant.workers.out_of_memory import DeviceOutOfMemory

    if isinstance(err, INPUT_ERRORS):
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:  # a worker's or the driver's write
        print(f"error: DiskFull: {err.filename or 'a file of the output'}: no space left on device; free space "
              "(or move output.uri / output.work_dir to a larger disk), then run the same command again: the job "
              "resumes after its last durable block and nothing was published", file=sys.stderr)
        return 1
    if isinstance(err, (KernelMismatch, WorkerDied, RendezvousTimeout, DeviceOutOfMemory)):  # one line, exit 1
        print(f"error: {type(err).__name__}: {err}", file=sys.stderr)
        return 1
    raise err


if __name__ == "__main__":
    run()

"""`rayquant reconcile SCHEDULE.yaml`: submit a job for every (watched source, recipe) whose output lacks it.

For each pair: resolve the source's revision now (cheaply: the Hub's commit sha, an S3 listing, a local
directory's headers), build the job spec, render the output URI and compute the job fingerprint. Then
the output decides, in this order:

    finished manifest with this fingerprint      up-to-date    nothing to do
    finished manifest of another job             conflict      reported, not submitted (exit 2)
    claim of another job                         conflict      reported, not submitted (exit 2)
    claim of this job, younger than stale        claimed       submitted already (by this or another reconciler)
    no claim, or a stale one of this job         submitted     claimed with a conditional create, then submitted

The claim (storage/output_claims.py) makes two reconcilers running at once submit each pair once.
A Hub source is pinned to the commit it resolved to (model.source = hf://org/name@<sha>); an S3 or local
source is read by the job as it is when the job opens it.
"""

from __future__ import annotations

import argparse
import os
import socket
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import structlog
from rayquant.jobs.schedule import (
    Recipe,
    Schedule,
    WatchedSource,
    build_job_spec,
    load_schedule,
    render_output,
    source_name,
)
from rayquant.jobs.spec import JobSpec

if TYPE_CHECKING:
    from rayquant.storage.output_claims import HeldBy

log = structlog.get_logger()

UP_TO_DATE, CONFLICT, CLAIMED, WOULD_SUBMIT, SUBMITTED, ERROR = (
    "up-to-date", "conflict", "claimed", "would-submit", "submitted", "error")
_FIX_TEMPLATE = "put {revision12} or {fingerprint12} in the recipe's output template, or delete the output"


@dataclass(frozen=True)
class ResolvedSource:
    uri: str  # as the schedule watches it
    name: str  # {name}
    job_uri: str  # the job's model.source: the Hub pinned to the resolved commit, else the watched URI
    revision: str  # ModelSource.revision, as the job will compute it


@dataclass(frozen=True)
class PlannedJob:
    source: ResolvedSource
    recipe: str
    spec: JobSpec
    fingerprint: str

    @property
    def output(self) -> str:
        return self.spec.output.uri


@dataclass(frozen=True)
class Decision:
    decision: str  # one of UP_TO_DATE, CONFLICT, CLAIMED, WOULD_SUBMIT
    reason: str


@dataclass(frozen=True)
class PairOutcome:
    source: str
    revision: str  # "" when the source could not be read
    recipe: str
    output: str  # "" when no output could be planned
    decision: str
    reason: str
    job_id: str | None = None

    def line(self) -> str:
        """One tab-separated line: source, revision (12), recipe, output, decision, reason."""
        fields = (self.source, self.revision[:12] or "-", self.recipe, self.output or "-", self.decision, self.reason)
        return "\t".join(fields)


def default_claimer() -> str:
    """This reconcile run's id in the claims it writes."""
    return f"reconcile@{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def resolve_source(source: WatchedSource) -> ResolvedSource:
    """The source's revision now, as the job will compute it (Hub: one request; S3: one listing; local: headers).

    Raises:
        the model source's errors (not found, invalid files, S3 / Hub not found, denied, unreachable).
    """
    uri = source.uri
    if uri.startswith("hf://"):
        from rayquant.storage.hub_files import parse_hub_uri, resolve_hub_revision

        repo_id, revision = parse_hub_uri(uri)
        sha = resolve_hub_revision(repo_id, revision)
        return ResolvedSource(uri, source_name(source), f"hf://{repo_id}@{sha}", sha)
    if uri.startswith("s3://"):
        from rayquant.storage.remote_model import (
            s3_files,  # lists only; downloads nothing
        )

        return ResolvedSource(uri, source_name(source), uri, s3_files(uri).revision)
    from rayquant.storage.model_source import open_model_source

    return ResolvedSource(uri, source_name(source), uri, open_model_source(uri).revision)


def plan_job(source: ResolvedSource, recipe: Recipe) -> PlannedJob:
    """The pair's spec, output and fingerprint (the fingerprint never depends on the output).

    Raises:
        SpecError: the rendered spec is invalid.
    """
    values = {"name": source.name, "recipe": recipe.name, "revision": source.revision,
              "revision12": source.revision[:12], "fingerprint12": "0" * 12}
    draft = build_job_spec(recipe, source.name, source.job_uri, render_output(recipe.output, values))
    fingerprint = draft.fingerprint(source.revision)
    output = render_output(recipe.output, values | {"fingerprint12": fingerprint[:12]})
    spec = build_job_spec(recipe, source.name, source.job_uri, output)
    return PlannedJob(source=source, recipe=recipe.name, spec=spec, fingerprint=fingerprint)


def decide(fingerprint: str, finished: str | None, claim: HeldBy | None, now: float, stale_after_s: float) -> Decision:
    """What one pair needs, from its output's finished fingerprint and claim."""
    if finished == fingerprint:
        return Decision(UP_TO_DATE, "the output holds this job's finished checkpoint")
    if finished is not None:
        return Decision(CONFLICT, f"the output holds another job's finished checkpoint (fingerprint "
                                  f"{finished[:12]}, this job {fingerprint[:12]}); {_FIX_TEMPLATE}")
    if claim is None:
        return Decision(WOULD_SUBMIT, "no finished output and no claim")
    age = f"{claim.age_s(now):.0f} s ago"
    if claim.fingerprint != fingerprint:
        return Decision(CONFLICT, f"the output is claimed by another job (fingerprint {claim.fingerprint[:12]}, "
                                  f"this job {fingerprint[:12]}, by {claim.holder} {age}); {_FIX_TEMPLATE}")
    if not claim.is_stale(now, stale_after_s):
        return Decision(CLAIMED, f"claimed by {claim.holder} {age}, not finished yet")
    return Decision(WOULD_SUBMIT, f"the claim by {claim.holder} ({age}) is older than claim_stale_after_s="
                                  f"{stale_after_s:g} and its job never finished")


def reconcile(schedule: Schedule, submit: Callable[[JobSpec], str], dry_run: bool = False,
              claimer: str | None = None) -> list[PairOutcome]:
    """Submit (through `submit`, which returns the job id) every pair without a finished output or a live
    claim; with dry_run, claim and submit nothing. One outcome per (source, recipe), in schedule order.

    Raises:
        whatever `submit` raises (after the pair's claim is released again).
    """
    claimer = claimer or default_claimer()
    errors = _pair_errors()
    pairs: list[PlannedJob | PairOutcome] = []
    for source in schedule.sources:
        try:
            resolved = resolve_source(source)
        except errors as err:
            pairs += [_failed(source.uri, "", r.name, err) for r in schedule.recipes]
            continue
        for recipe in schedule.recipes:
            try:
                pairs.append(plan_job(resolved, recipe))
            except errors as err:
                pairs.append(_failed(source.uri, resolved.revision, recipe.name, err))
    shared = shared_outputs([p for p in pairs if isinstance(p, PlannedJob)])
    outcomes = []
    for pair in pairs:
        if isinstance(pair, PlannedJob):
            pair = _share_conflict(pair, shared) or _reconcile_pair(
                pair, submit, dry_run, claimer, schedule.claim_stale_after_s, errors)
        log.info("reconcile_pair", source=pair.source, revision=pair.revision[:12], recipe=pair.recipe,
                 output=pair.output, decision=pair.decision, job_id=pair.job_id)
        outcomes.append(pair)
    return outcomes


def shared_outputs(jobs: list[PlannedJob]) -> dict[str, list[PlannedJob]]:
    """Outputs that more than one pair renders to (their templates cannot tell the pairs apart)."""
    counts = Counter(job.output for job in jobs)
    return {out: [job for job in jobs if job.output == out] for out, n in counts.items() if n > 1}


def _share_conflict(job: PlannedJob, shared: dict[str, list[PlannedJob]]) -> PairOutcome | None:
    if job.output not in shared:
        return None
    others = [f"{o.source.uri} × {o.recipe}" for o in shared[job.output] if o is not job]
    return _outcome(job, Decision(CONFLICT, f"{', '.join(others)} renders the same output; put {{name}} and "
                                            "{recipe} (or {fingerprint12}) in the output templates"))


def _reconcile_pair(job: PlannedJob, submit: Callable[[JobSpec], str], dry_run: bool, claimer: str,
                    stale_after_s: float, errors: tuple[type[Exception], ...]) -> PairOutcome:
    from rayquant.storage.output_claims import claim_output, read_claim, release_claim

    try:
        decision = decide(job.fingerprint, finished_fingerprint(job.output), read_claim(job.output), time.time(),
                          stale_after_s)
        if decision.decision != WOULD_SUBMIT or dry_run:
            return _outcome(job, decision)
        claimed = claim_output(job.output, job.fingerprint, claimer, stale_after_s)
    except errors as err:
        return _failed(job.source.uri, job.source.revision, job.recipe, err, job.output)
    if not claimed.won:  # another reconciler was first between our read and our create
        return _outcome(job, decide(job.fingerprint, None, claimed.claim, time.time(), stale_after_s))
    try:
        job_id = submit(job.spec)
    except BaseException:
        release_claim(job.output, claimed.claim)  # the next reconcile submits it, not after claim_stale_after_s
        raise
    reason = decision.reason + (f"; took over the stale claim of {claimed.replaced.holder}" if claimed.replaced else "")
    return _outcome(job, Decision(SUBMITTED, f"{reason}; job {job_id}"), job_id)


def finished_fingerprint(uri: str) -> str | None:
    """The job fingerprint of the finished checkpoint at output `uri` (its manifest), None if unfinished.

    Raises:
        OutputConflict, S3OutputConflict, HubOutputConflict: a manifest rayquant did not write.
        the S3 / Hub errors (not found, denied, unreachable).
    """
    from rayquant.storage.output_layout import MANIFEST_FILE
    from rayquant.storage.sinks import open_sink
    from rayquant.storage.staging import OutputConflict, read_json_object

    sink = open_sink(uri)
    if sink is not None:
        manifest = sink.published_manifest()
        return None if manifest is None else str(manifest["job_fingerprint"])
    path = Path(uri) / MANIFEST_FILE
    if not path.is_file():
        return None
    manifest = read_json_object(path)
    if manifest is None or "job_fingerprint" not in manifest:
        raise OutputConflict(f"output {uri} holds a {MANIFEST_FILE} that rayquant did not write; choose another "
                             "output template or delete the directory")
    return str(manifest["job_fingerprint"])


def _outcome(job: PlannedJob, decision: Decision, job_id: str | None = None) -> PairOutcome:
    return PairOutcome(job.source.uri, job.source.revision, job.recipe, job.output, decision.decision,
                       decision.reason, job_id)


def _failed(source: str, revision: str, recipe: str, err: Exception, output: str = "") -> PairOutcome:
    return PairOutcome(source, revision, recipe, output, ERROR, f"{type(err).__name__}: {err}")


def _pair_errors() -> tuple[type[Exception], ...]:
    """The errors that fail one pair (its source or output unreadable), not the whole reconcile."""
    from rayquant.jobs.spec import SpecError
    from rayquant.storage.hub_files import (
        HubAccessDenied,
        HubRepoNotFound,
        HubRevisionNotFound,
        HubUnreachable,
    )
    from rayquant.storage.hub_sink import HubOutputConflict
    from rayquant.storage.model_source import (
        InvalidModelFiles,
        ModelNotFound,
        UnsupportedModelSource,
    )
    from rayquant.storage.output_claims import MalformedClaim
    from rayquant.storage.s3_files import (
        S3AccessDenied,
        S3ObjectNotFound,
        S3Unreachable,
    )
    from rayquant.storage.s3_sink import S3OutputConflict
    from rayquant.storage.safetensors_reader import CorruptSafetensors
    from rayquant.storage.staging import OutputConflict

    return (SpecError, ModelNotFound, InvalidModelFiles, UnsupportedModelSource, CorruptSafetensors,
            S3ObjectNotFound, S3AccessDenied, S3Unreachable, S3OutputConflict, HubRepoNotFound, HubRevisionNotFound,
            HubAccessDenied, HubUnreachable, HubOutputConflict, OutputConflict, MalformedClaim)


# --- the command line (the lead wires these into jobs/cli.build_parser)


def add_reconcile_parser(subparsers) -> None:
    """`rayquant reconcile SCHEDULE.yaml [--dry-run] [--address ADDRESS]`."""
    r = subparsers.add_parser(
        "reconcile", help="submit a job for every watched source revision × recipe without a finished output",
        description="Resolve every watched source's revision, and submit each (source, recipe) job whose output "
                    "holds neither its finished checkpoint nor a live claim. Prints one tab-separated line per "
                    "pair: source, revision, recipe, output, decision, reason. Exit 2 if any pair is a conflict "
                    "or could not be read.")
    r.add_argument("schedule", help="schedule YAML (jobs/specs/schedule-example.yaml)")
    r.add_argument("--dry-run", action="store_true", help="claim and submit nothing; list what would run and why")
    r.add_argument("--address", default=None,
                   help="the Ray cluster's Jobs API address (http://head:8265); default: RAY_ADDRESS")
    r.set_defaults(run=run_reconcile)


def run_reconcile(args: argparse.Namespace) -> int:
    """The `reconcile` command: 0 when every pair is up to date, claimed or submitted; 2 otherwise.

    Raises:
        ScheduleError: the schedule file is invalid.
    """
    schedule = load_schedule(Path(args.schedule))
    if args.dry_run:
        outcomes = reconcile(schedule, _submit_nothing, dry_run=True)
    else:
        from rayquant.jobs.submission import submit_spec  # the Ray Jobs API client

        outcomes = reconcile(schedule, lambda spec: submit_spec(spec, args.address).job_id)
    for outcome in outcomes:
        print(outcome.line())
    return 2 if any(o.decision in (CONFLICT, ERROR) for o in outcomes) else 0


def _submit_nothing(spec: JobSpec) -> str:
    raise RuntimeError(f"dry run: {spec.name} must not be submitted")

"""Every `rayquant` command line in infra/ is one the CLI accepts, with those flags."""

from __future__ import annotations

import shlex
from urllib.parse import urlsplit

import pytest

from rayquant.jobs.cli import build_parser
from rayquant.jobs.spec import load_spec
from tests.infra.manifests import CliCommand, manifests, rayquant_commands


COMMANDS = rayquant_commands()


def test_the_manifests_and_the_dockerfile_run_quantize_reconcile_and_a_smoke_check():
    assert sorted(c.argv[0] for c in COMMANDS) == ["example-spec", "quantize", "reconcile"]


@pytest.mark.parametrize("command", [pytest.param(c, id=c.where) for c in COMMANDS])
def test_cli_accepts_the_command_and_its_flags(command: CliCommand, capsys):
    try:
        args = build_parser().parse_args(command.argv)
    except SystemExit as exit_:  # argparse: 2 and a usage line for an unknown command or flag
        pytest.fail(f"{command.where}: `rayquant {shlex.join(command.argv)}` exits {exit_.code}: "
                    f"{capsys.readouterr().err.strip()}")
    assert args.command == command.argv[0]


def test_rayjob_overrides_are_valid_job_spec_fields_for_a_remote_output():
    """The RayJob's `--set`s on a spec whose output is s3:// (what a remote cluster needs) validate."""
    (entrypoint,) = [c for c in COMMANDS if c.argv[0] == "quantize"]
    args = build_parser().parse_args(entrypoint.argv)
    spec = load_spec(None, [*args.set, "output.uri=s3://bucket/llama-70b-w4g128"])
    assert (spec.cluster.address, spec.cluster.gpus_per_worker, spec.output.shared) == ("auto", 1, True)
    assert spec.output.work_dir.startswith("/mnt/rayquant-work/")


def test_reconcile_talks_to_the_jobs_api_of_the_rayclusters_head_service():
    """KubeRay names a RayCluster's head Service <name>-head-svc; Ray's Jobs API listens on 8265."""
    (reconcile,) = [c for c in COMMANDS if c.argv[0] == "reconcile"]
    address = urlsplit(reconcile.argv[reconcile.argv.index("--address") + 1])
    (cluster,) = [m.doc for m in manifests() if m.doc["kind"] == "RayCluster"]
    assert (address.scheme, address.hostname, address.port) == ("http", f"{cluster['metadata']['name']}-head-svc", 8265)

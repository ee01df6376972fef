"""The first minute with `rayquant`: fast help and version, an annotated example spec, readable progress."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.metadata import version

import structlog
import yaml

from rayquant.jobs.cli import EXAMPLE_SPEC, main
from rayquant.jobs.logs import configure_logging
from rayquant.jobs.progress import JobProgress
from rayquant.jobs.spec import JobSpec

# which heavy modules a command imported, from a fresh interpreter
_IMPORTED = """
import json, sys
from rayquant.jobs.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({m: m in sys.modules for m in ("torch", "ray", "transformers")}), file=sys.stderr)
"""


def _imported_by(*args: str) -> dict[str, bool]:
    proc = subprocess.run([sys.executable, "-c", _IMPORTED, *args], capture_output=True, text=True, timeout=60)
    return json.loads(proc.stderr.strip().splitlines()[-1])


def test_help_and_version_import_neither_torch_nor_ray():
    for args in (["--help"], ["--version"], ["quantize", "--help"], ["eval", "--help"], ["example-spec"],
                 ["plan", "--help"], ["reconcile", "--help"], ["submit", "--help"]):
        assert _imported_by(*args) == {"torch": False, "ray": False, "transformers": False}, args


def test_version_names_the_installed_release(capsys):
    try:
        main(["--version"])
    except SystemExit as done:
        assert done.code == 0
    assert capsys.readouterr().out.strip() == f"rayquant {version('rayquant')}"


def test_quantize_help_names_every_spec_section_and_the_example_command(capsys):
    try:
        main(["quantize", "--help"])
    except SystemExit:
        pass
    text = capsys.readouterr().out
    for section in JobSpec.model_fields:
        assert f"\n  {section} " in text, section
    assert "rayquant example-spec" in text


def test_example_spec_command_prints_a_spec_that_runs_with_the_defaults(capsys):
    assert main(["example-spec"]) == 0
    printed = capsys.readouterr().out
    assert printed == EXAMPLE_SPEC.read_text()
    assert JobSpec.model_validate(yaml.safe_load(printed)) == JobSpec()


def test_off_a_terminal_every_log_line_is_one_json_object(capsys):
    configure_logging(verbose=False, terminal=False)
    structlog.contextvars.clear_contextvars()  # an in-process worker test may have bound its rank here
    structlog.contextvars.bind_contextvars(job_id="j1", block=3)
    try:
        progress = JobProgress("job", n_blocks=4, first_block=0, terminal=False)
        progress.stage(3, "solve")  # off a terminal: nothing
        progress.block_done(3, 1.25, replayed=False, stages={"solve": 0.5})
        structlog.get_logger().debug("hidden")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1
    event = json.loads(lines[0])
    assert event | {"timestamp": None} == {"event": "block_done", "progress": "4/4", "replayed": False,
                                          "seconds": 1.25, "eta_s": 0.0, "stages": {"solve": 0.5},
                                          "job_id": "j1", "block": 3, "level": "info", "timestamp": None}
    assert event["timestamp"].endswith("Z")


def test_on_a_terminal_the_bar_shows_blocks_stage_and_seconds_per_block(capsys):
    progress = JobProgress("tiny", n_blocks=4, first_block=1, terminal=True)  # block 0 done by an earlier run
    try:
        progress.bar.ncols = 120  # capsys is no terminal: give the bar a width
        progress.stage(1, "collect")
        progress.block_done(1, 2.0, replayed=False)
        progress.stage(2, "solve")
        progress.block_done(2, 4.0, replayed=False)
    finally:
        progress.close()
    screen = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert any(line.startswith("tiny: 1/4 blocks, block 1 collect |") for line in screen), screen
    assert any(line.startswith("tiny: 2/4 blocks, block 2 solve, 2.00 s/block |") for line in screen), screen
    assert screen[-1].startswith("tiny: 3/4 blocks, done, 3.00 s/block |"), screen


def test_a_full_disk_is_one_line_that_says_the_job_resumes(capsys):
    import errno

    from rayquant.jobs.cli import _report_error

    err = OSError(errno.ENOSPC, "No space left on device", "/data/out/.rayquant-staging/model-00001.safetensors")
    assert _report_error(err) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: DiskFull: /data/out/")
    assert "run the same command" in lines[0]

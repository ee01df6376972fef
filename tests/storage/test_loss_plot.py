"""loss-ratio.png: one marker series per linear kind by block; the same report gives the same bytes, whatever the
machine's matplotlibrc; workers never import matplotlib, and a driver without it gets an error naming the fix."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import matplotlib
import pytest

from rayquant.storage.loss_plot import DPI, FIGURE_INCHES, LayerRatio, layer_ratios, render_loss_ratio_png

from .test_job_records import DENSE, EXPERT, REPORT

REPO = Path(__file__).resolve().parents[2]
# the report comes in as JSON on stdin: job_records and loss_plot import no torch, so these processes start fast
_RENDER = """
import json, sys
from rayquant.storage.job_records import JobReport
from rayquant.storage.loss_plot import render_loss_ratio_png
sys.stdout.buffer.write(render_loss_ratio_png(JobReport.from_json(json.load(sys.stdin))))
"""


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(type, data) of every chunk of a PNG file."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, at = [], 8
    while at < len(png):
        (length,) = struct.unpack(">I", png[at:at + 4])
        chunks.append((png[at + 4:at + 8], png[at + 8:at + 8 + length]))
        at += 12 + length
    return chunks


def run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    """code in a fresh interpreter from the repository root, REPORT's JSON on its stdin."""
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env={**os.environ, **env}, capture_output=True,
                          input=json.dumps(REPORT.to_json()).encode(), timeout=120)


def test_layer_ratios_name_block_and_kind_with_expert_indices_as_a_star():
    zero_rtn = replace(DENSE, name="model.layers.12.self_attn.o_proj", gptq_loss=0.0, rtn_loss=0.0)
    assert layer_ratios([EXPERT, DENSE, zero_rtn]) == [
        LayerRatio(name=EXPERT.name, block=0, kind="block_sparse_moe.experts.*.w1", ratio=0.25),
        LayerRatio(name=DENSE.name, block=0, kind="mlp.down_proj", ratio=7.5e-05),
        LayerRatio(name="model.layers.12.self_attn.o_proj", block=12, kind="self_attn.o_proj", ratio=None),
    ]


def test_a_layer_outside_any_block_is_refused_naming_it():
    with pytest.raises(ValueError, match="'lm_head' has no block index"):
        layer_ratios([replace(DENSE, name="lm_head")])


def test_two_renders_of_one_report_are_byte_identical_and_another_report_differs():
    png = render_loss_ratio_png(REPORT)
    assert png == render_loss_ratio_png(REPORT)
    assert png != render_loss_ratio_png(replace(REPORT, layers=(replace(DENSE, gptq_loss=0.5), EXPERT)))
    assert png != render_loss_ratio_png(replace(REPORT, job="other"))  # the title names the job


def test_png_has_the_fixed_size_and_no_software_or_date_metadata():
    chunks = png_chunks(render_loss_ratio_png(REPORT))
    width, height = struct.unpack(">II", chunks[0][1][:8])
    assert chunks[0][0] == b"IHDR" and (width, height) == (FIGURE_INCHES[0] * DPI, FIGURE_INCHES[1] * DPI)
    assert {kind for kind, _ in chunks} == {b"IHDR", b"pHYs", b"IDAT", b"IEND"}  # no tEXt/tIME: no Software, no date


def test_report_without_a_plottable_ratio_still_gets_a_picture():
    empty = render_loss_ratio_png(replace(REPORT, layers=(replace(DENSE, gptq_loss=0.0, rtn_loss=0.0),)))
    assert png_chunks(empty)[-1][0] == b"IEND" and empty != render_loss_ratio_png(REPORT)


def test_the_machines_matplotlibrc_does_not_change_the_bytes(tmp_path: Path):
    expected = render_loss_ratio_png(REPORT)  # also builds matplotlib's font cache, if this is its first use
    config = tmp_path / "mplconfig"
    shutil.copytree(matplotlib.get_cachedir(), config)  # the font cache: not rebuilt (seconds) in this new config dir
    (config / "matplotlibrc").write_text("font.size: 30\nlines.markersize: 20\naxes.facecolor: black\n"
                                        "savefig.dpi: 300\nfigure.figsize: 3, 3\n")
    styled = run_python(_RENDER, {"MPLCONFIGDIR": str(config)})
    assert styled.returncode == 0, styled.stderr.decode()[-2000:]
    assert styled.stdout == expected


def test_a_driver_without_matplotlib_gets_an_error_naming_the_fix_and_no_secret():
    secret, token = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY", "hf_SeCrEtToKeN0123456789"
    code = """
import json, sys
sys.modules["matplotlib"] = None  # what Python does when the package is not installed: the import fails
from rayquant.storage.job_records import JobReport
from rayquant.storage.loss_plot import MatplotlibMissing, render_loss_ratio_png
try:
    render_loss_ratio_png(JobReport.from_json(json.load(sys.stdin)))
except MatplotlibMissing as err:
    print(json.dumps(str(err)))
"""
    proc = run_python(code, {"AWS_SECRET_ACCESS_KEY": secret, "HF_TOKEN": token})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    message = json.loads(proc.stdout)
    assert "pip install 'matplotlib>=3.9'" in message and "run the same command again" in message
    assert secret not in message and token not in message


def test_writing_the_card_and_finishing_import_no_matplotlib_until_the_picture_is_drawn():
    code = """
import sys
import json
import rayquant.storage.finished_checkpoint, rayquant.storage.loss_plot
from rayquant.storage.job_records import JobReport
from rayquant.storage.model_card import render_model_card
render_model_card(JobReport.from_json(json.load(sys.stdin)), {"name": "tiny"})
print(sorted(name for name in sys.modules if name.split(".")[0] == "matplotlib"))
"""
    proc = run_python(code, {})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == "[]"


def test_the_background_import_loads_the_picture_s_modules_and_the_bytes_stay_the_same():
    code = """
import sys, threading, json
from rayquant.storage.job_records import JobReport
from rayquant.storage.loss_plot import import_matplotlib_in_background, render_loss_ratio_png
report = JobReport.from_json(json.load(sys.stdin))
import_matplotlib_in_background()
png = render_loss_ratio_png(report)  # may meet the import still under way: it waits for it
[t.join() for t in threading.enumerate() if t.name == "import-matplotlib"]
assert "matplotlib.figure" in sys.modules and "matplotlib.ticker" in sys.modules
sys.stdout.buffer.write(png)
"""
    proc = run_python(code, {})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout == render_loss_ratio_png(REPORT)


def test_the_background_import_without_matplotlib_leaves_the_error_to_the_render():
    code = """
import sys, threading, json
sys.modules["matplotlib"] = None
from rayquant.storage.job_records import JobReport
from rayquant.storage.loss_plot import MatplotlibMissing, import_matplotlib_in_background, render_loss_ratio_png
import_matplotlib_in_background()
[t.join() for t in threading.enumerate() if t.name == "import-matplotlib"]
try:
    render_loss_ratio_png(JobReport.from_json(json.load(sys.stdin)))
except MatplotlibMissing:
    print("missing")
"""
    proc = run_python(code, {})
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    assert proc.stdout.decode().strip() == "missing"
    assert b"Traceback" not in proc.stderr

"""Jobs for end-to-end tests that read a job's output rather than watch the job run: `rayquant quantize`
with tiny-llama.yaml and `--set`s, once per distinct settings in the session (the `quantize_once` fixture),
queued ahead by the modules that need several (two run at a time)."""

from __future__ import annotations

import subprocess
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from .models import SPEC, run_cli


@dataclass(frozen=True)
class QuantizeRun:
    proc: subprocess.CompletedProcess  # the CLI's exit code, stdout and stderr (JSON log lines)
    out: Path  # output.uri

    def output(self) -> Path:
        """The output folder of a job that succeeded."""
        assert self.proc.returncode == 0, self.proc.stderr[-3000:]
        return self.out


class QuantizeJobs:
    """`rayquant quantize tiny-llama.yaml --set ...` into a fresh folder, run once per distinct settings in
    the session: tests that read the same job's output (files, report, log) share it, from any module.

    `start` queues jobs to run in the background, two at a time: a module queues the jobs of its selected
    tests, so one job runs while a test reads the output of the one before (a job alone keeps 2 cores
    busy for less than half its time: start-up, imports, Ray). Jobs are deterministic, so their outputs do
    not depend on what runs beside them.
    """

    def __init__(self, tmp_path_factory: pytest.TempPathFactory):
        self._folders = tmp_path_factory
        self._pool = ThreadPoolExecutor(2, thread_name_prefix="quantize-job")
        self._runs: dict[tuple[str, ...], Future[QuantizeRun]] = {}

    def start(self, *sets: str) -> None:
        """Queue the job with these `--set`s unless it ran or is queued already."""
        if sets not in self._runs:
            out = self._folders.mktemp("quantized") / "out"  # here: the factory is not for threads
            self._runs[sets] = self._pool.submit(self._run, sets, out)

    def __call__(self, *sets: str) -> QuantizeRun:
        """The job with these `--set`s; runs it now unless it ran or is queued, and waits for it.
        A test that runs a job into its output again must leave it byte for byte as it was."""
        self.start(*sets)
        return self._runs[sets].result()

    def finish(self) -> None:
        """Drop the jobs still queued, wait for those running: no job outlives the tests that queued it."""
        for sets, run in list(self._runs.items()):
            if run.cancel():
                del self._runs[sets]
        for run in self._runs.values():
            run.exception()

    @staticmethod
    def _run(sets: tuple[str, ...], out: Path) -> QuantizeRun:
        proc = run_cli("quantize", str(SPEC), *(a for s in (*sets, f"output.uri={out}") for a in ("--set", s)))
        return QuantizeRun(proc, out)

    def close(self) -> None:
        self.finish()
        self._pool.shutdown()


def selected_params(request: pytest.FixtureRequest, name: str) -> list:
    """The values of the parameter `name` of this module's selected tests, in the order they run."""
    return [item.callspec.params[name] for item in request.session.items
            if item.module is request.module and hasattr(item, "callspec") and name in item.callspec.params]

"""What `rayquant status` shows: Ray's status of the job beside the job's own progress records.

The job's records, in the folder where its output is built (the `rayquant_work_dir` of the job's metadata):
while it runs or after it stopped, `.rayquant-staging/status.json` (jobs/progress.py: blocks done of how
many, block and stage, seconds per block, ETA); once finished, the manifest (its block count). That folder
is on the Ray node that runs the driver: `status` reads it there or through a mount every node shares
(`output.shared: true`). From anywhere else it says the progress is not visible here and shows Ray's status.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from rayquant.jobs.progress import STATUS_FILE
from rayquant.storage.output_layout import MANIFEST_FILE, STAGING


@dataclass(frozen=True)
class JobStatusView:
    """One job as `status` prints it."""

    job_id: str
    ray_status: str  # PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED
    spec: str
    output: str
    progress_from: str  # "status.json", "manifest", or why the progress is not shown
    blocks_done: int | None = None
    n_blocks: int | None = None
    block: int | None = None
    stage: str | None = None
    seconds_per_block: float | None = None
    eta_s: float | None = None
    message: str | None = None  # Ray's message about the job (why it failed or stopped)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    def lines(self) -> list[str]:
        """The human form: one `key: value` line per known field."""
        shown = {
            "job": self.job_id, "ray status": self.ray_status, "spec": self.spec,
            "blocks": None if self.n_blocks is None else f"{self.blocks_done}/{self.n_blocks}",
            "stage": None if self.stage is None else (f"{self.stage} (block {self.block})" if self.block is not None
                                                      else self.stage),
            "seconds per block": self.seconds_per_block, "eta (s)": self.eta_s, "output": self.output,
            "progress": None if self.progress_from in ("status.json", "manifest") else self.progress_from,
            "message": self.message,
        }
        return [f"{key}: {value}" for key, value in shown.items() if value is not None]


def job_status_view(job_id: str, ray_status: str, metadata: dict[str, str], message: str | None) -> JobStatusView:
    """Ray's status and metadata of a rayquant job plus whatever progress record its work folder holds."""
    base = {"job_id": job_id, "ray_status": ray_status, "spec": metadata.get("rayquant_spec", "?"),
            "output": metadata.get("rayquant_output", "?"), "message": message or None}
    work_dir = Path(metadata.get("rayquant_work_dir", ""))
    record = _read_json(work_dir / STAGING / STATUS_FILE)
    manifest = _read_json(work_dir / MANIFEST_FILE)
    if manifest is not None and manifest.get("job_fingerprint") == metadata.get("rayquant_fingerprint"):
        n = int(manifest.get("n_blocks", 0))
        return JobStatusView(**base, progress_from="manifest", blocks_done=n, n_blocks=n, stage="done")
    if record is not None:
        return JobStatusView(**base, progress_from="status.json", blocks_done=record["blocks_done"],
                             n_blocks=record["n_blocks"], block=record["block"], stage=record["stage"],
                             seconds_per_block=record["seconds_per_block"], eta_s=record["eta_s"])
    if not work_dir.is_dir():
        why = (f"not visible here: the job builds its output in {work_dir} on the Ray node that runs it; "
               "run `rayquant status` there or on a mount every node shares")
        if ray_status == "SUCCEEDED" and "://" in base["output"]:
            why = "published (the work folder is removed after the upload)"
        return JobStatusView(**base, progress_from=why)
    return JobStatusView(**base, progress_from="no progress record yet (the job is starting)")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError):
        return None

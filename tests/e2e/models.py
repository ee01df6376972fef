"""Reference models for end-to-end checks: the fp source, rayquant's own dequantized reading of an
output, and an RTN baseline with the same settings. (The independent reader is gptq_loader.py.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rayquant.solver.gptq import GPTQConfig, dequantize
from rayquant.solver.pack import PACKED_FIELDS, PackedLinear, dequantize_packed, packed_bits
from rayquant.solver.rtn import quantize_rtn
from rayquant.storage.output_layout import RUN_STATS_FILE

REPO = Path(__file__).resolve().parents[2]
SPEC = REPO / "jobs" / "specs" / "tiny-llama.yaml"


def run_cli(*args: str, timeout: float = 600, **kw) -> subprocess.CompletedProcess:
    """The real `rayquant` command in a subprocess, as a user runs it."""
    return subprocess.run([sys.executable, "-m", "rayquant.jobs.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=kw.pop("cwd", REPO), **kw)


def log_events(stderr: str, event: str) -> list[dict]:
    """The CLI's log lines named `event` (stderr off a terminal is one JSON object per line)."""
    events = [json.loads(line) for line in stderr.splitlines() if line.startswith("{")]
    return [e for e in events if e["event"] == event]


def fp_model(source_dir: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(source_dir, dtype=torch.float32).eval()


def dequantized_model(source_dir: Path, checkpoint_dir: Path) -> torch.nn.Module:
    """The fp model with every quantized linear replaced by the checkpoint's dequantized weight."""
    model = fp_model(source_dir)
    index = json.loads((checkpoint_dir / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = {}
    for shard in sorted(set(index.values())):
        with safe_open(checkpoint_dir / shard, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    params = dict(model.named_parameters())
    for name in [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]:
        packed = PackedLinear(**{f: tensors[f"{name}.{f}"] for f in PACKED_FIELDS})
        with torch.no_grad():
            params[f"{name}.weight"].copy_(dequantize_packed(packed, packed_bits(packed)))
    return model


def rtn_model(source_dir: Path, cfg: GPTQConfig) -> torch.nn.Module:
    """RTN with the same bits/groups/sym on every linear inside the decoder blocks."""
    model = fp_model(source_dir)
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and ".layers." in name:
            W = mod.weight.detach()
            eye = torch.eye(W.shape[1])
            r = quantize_rtn(W, eye, 1, cfg)
            with torch.no_grad():
                mod.weight.copy_(dequantize(r.codes, r.scales, r.zeros, r.g_idx))
    return model


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids).logits.float()


def logit_mse(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b) ** 2).mean())


def output_files(out: Path) -> dict[str, bytes]:
    """Every file of an output but run-stats.json (this run's timings: the one file that may differ)."""
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != RUN_STATS_FILE}

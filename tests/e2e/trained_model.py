"""synthetic://llama-tiny after a short training run on the shipped text, for quality comparisons.

A random-init model predicts nothing (perplexity ≈ vocab size, 1043 on the eval windows), so the
effect of quantization on its perplexity is noise of either sign. A few hundred AdamW steps on the
calibration part of builtin://text (never the held-out tail the eval windows come from) bring it
to a perplexity of ~75, where 4-bit quantization costs a measurable, ordered amount: fp < GPTQ < RTN.
Built once into $RAYQUANT_CACHE/trained/ (tests set it to the session cache), as bf16 safetensors
with the source's tokenizer, i.e. an ordinary local model directory for `model.source`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from rayquant.storage.calibration import load_calibration
from rayquant.storage.model_source import AUX_FILES, default_cache_dir, open_model_source

STEPS = 200
BATCH = 8
SEQ_LEN = 256
PEAK_LR = 3e-3


def trained_llama_tiny() -> Path:
    """Directory of the trained tiny Llama; trains it (~30 s on 2 idle cores) on first use."""
    return trained_tiny("llama-tiny")


def trained_moe_tiny() -> Path:
    """Directory of the trained tiny Qwen3-MoE (8 experts, top-2); trains it on first use. Its router's
    load-balancing loss is on while training, as for real MoE models, so every expert keeps some tokens."""
    return trained_tiny("qwen3-moe-tiny")


def trained_tiny(preset: str) -> Path:
    """Directory of synthetic://<preset> after STEPS AdamW steps on the shipped text (built once)."""
    out = default_cache_dir().parent / "trained" / f"{preset}-{STEPS}steps"
    if (out / "config.json").is_file():
        return out
    source = open_model_source(f"synthetic://{preset}").path
    torch.manual_seed(0)
    # seed 1: other windows than the jobs' calibration (seed 0); both come from the calibration part
    windows = load_calibration("builtin://text", source, STEPS * BATCH, SEQ_LEN, 0, seed=1).samples
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=PEAK_LR, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=PEAK_LR, total_steps=STEPS, pct_start=0.1)
    for step in range(STEPS):
        ids = windows[step * BATCH:(step + 1) * BATCH]
        # MoE: output_router_logits adds the router's load-balancing loss (router_aux_loss_coef) to the loss
        moe = {"output_router_logits": True} if getattr(model.config, "num_experts", None) else {}
        model(input_ids=ids, labels=ids, **moe).loss.backward()
        opt.step()
        opt.zero_grad()
        schedule.step()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of a shared cache
    model.to(torch.bfloat16).save_pretrained(staging)
    for name in AUX_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, staging / name)
    try:
        staging.rename(out)  # atomic: a concurrent builder's finished directory wins
    except OSError:
        shutil.rmtree(staging)
    return out

"""Peak resident memory of a worker loading one block from S3, against the block's bytes.

A Llama-shaped model with ~190 MB bf16 blocks (hidden 2560, MLP 8960, 2 blocks) is written with
safetensors' own writer, uploaded to a real S3 server (SeaweedFS `weed mini` on 127.0.0.1), and a
fresh process then opens s3://... and loads block 0 the way a worker does (workers/block_load.py,
one rank: every tensor of the block by one ranged GET each). Its peak RSS above the RSS before the load
is printed beside the block's bytes, and the same load from the local copy in another fresh process.

    python -m tests.bench.s3_load_bench [--work-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HIDDEN, MLP, HEADS, KV_HEADS, VOCAB, BLOCKS = 2560, 8960, 20, 4, 1024, 2
REPO = Path(__file__).resolve().parents[2]


def write_model(folder: Path, hidden: int = HIDDEN, mlp: int = MLP, heads: int = HEADS, kv_heads: int = KV_HEADS,
                blocks: int = BLOCKS) -> Path:
    """A seeded Llama of this shape: one shard per block plus one for the embeddings, llama-tiny's tokenizer."""
    import shutil

    import torch
    from safetensors.torch import save_file

    from rayquant.storage.model_source import open_model_source

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    head_dim = hidden // heads
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * head_dim, hidden),
              "self_attn.v_proj": (kv_heads * head_dim, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
    n_files = blocks + 1
    for b in range(blocks):
        tensors = {f"model.layers.{b}.{k}.weight": (torch.randn(s, generator=g) / s[1] ** 0.5).bfloat16()
                   for k, s in shapes.items()}
        tensors |= {f"model.layers.{b}.{n}.weight": torch.ones(hidden, dtype=torch.bfloat16)
                    for n in ("input_layernorm", "post_attention_layernorm")}
        save_file(tensors, folder / f"model-{b + 1:05d}-of-{n_files:05d}.safetensors")
    save_file({"model.embed_tokens.weight": torch.randn(VOCAB, hidden, generator=g).bfloat16(),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)},
              folder / f"model-{n_files:05d}-of-{n_files:05d}.safetensors")
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
        "intermediate_size": mlp, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "num_hidden_layers": blocks, "vocab_size": VOCAB, "tie_word_embeddings": True, "dtype": "bfloat16"}))
    tokenizer = open_model_source("synthetic://llama-tiny").path  # the same 1024-token vocabulary
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer / name, folder / name)
    return folder


def load_block(uri: str) -> dict:
    """In this (fresh) process: open `uri`, load block 0 as a one-rank worker does; RSS before and at peak."""
    import resource

    import torch

    from rayquant.storage.model_source import open_model_source
    from rayquant.workers.block_load import read_share
    from rayquant.workers.rank_group import RankGroup

    source = open_model_source(uri)
    prefix = "model.layers.0."
    block_bytes = sum(i.nbytes for n, i in source.tensors.items() if n.startswith(prefix))
    rss_before = _rss_bytes()
    t = time.perf_counter()
    block = read_share(RankGroup(0, 1, torch.device("cpu")), source, prefix)
    seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert sum(x.numel() * x.element_size() for x in block.values()) == block_bytes
    return {"uri": uri, "block_bytes": block_bytes, "rss_before": rss_before, "peak_rss": peak,
            "seconds": round(seconds, 3)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work-dir", type=Path, default=None)
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: the fresh process that loads
    args = parser.parse_args()
    if args.load:
        print(json.dumps(load_block(args.load)))
        return
    sys.path.insert(0, str(REPO))
    from tests.s3_server import run_s3_server

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="s3-load-bench-"))
    model = write_model(work / "model")
    with run_s3_server(work / "s3") as server:
        client = server.client()
        server.create_bucket("bench")
        for path in sorted(model.iterdir()):
            client.upload_file(str(path), "bench", f"model/{path.name}")
        env = {**os.environ, **server.env(), "RAYQUANT_CACHE": str(work / "cache")}
        print(f"{'source':<28} {'block MB':>9} {'RSS before MB':>14} {'peak RSS MB':>12} {'peak - before':>14} "
              f"{'ratio':>6} {'s':>6}")
        for uri in ("s3://bench/model", str(model)):
            out = subprocess.run([sys.executable, "-m", "tests.bench.s3_load_bench", "--load", uri], env=env,
                                 cwd=REPO, capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            grown = r["peak_rss"] - r["rss_before"]
            print(f"{uri[:28]:<28} {r['block_bytes'] / 1e6:>9.1f} {r['rss_before'] / 1e6:>14.1f} "
                  f"{r['peak_rss'] / 1e6:>12.1f} {grown / 1e6:>14.1f} {grown / r['block_bytes']:>6.2f} "
                  f"{r['seconds']:>6.2f}")


if __name__ == "__main__":
    main()

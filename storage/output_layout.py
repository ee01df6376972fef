"""The names in a job's local output directory, shared by the staging area and the finished checkpoint.

The shard layout is planned before block 0 (storage/shard_plan.py); blocks go straight into their
final shards, written once by the worker that holds them (DESIGN.md §9):

    <out>/.rayquant-staging/job.json                         job fingerprint + resolved spec
    <out>/.rayquant-staging/model-00002-of-00009.safetensors a shard still being filled (open)
    <out>/.rayquant-staging/block-00003.done                 block 3 is durable: its layer records and stats
    <out>/model-00001-of-00009.safetensors                   a closed shard: every tensor in it durable

storage/staging.py owns the staging area and the shards until they close; storage/finished_checkpoint.py
writes the rest and, last, the manifest: a directory with our manifest holds a finished checkpoint, one
without does not. Bytes are a pure function of the inputs (sorted JSON keys, no timestamps,
safetensors' fixed layout), so a rerun or a resumed job writes identical files.
"""

STAGING = ".rayquant-staging"
JOB_FILE = "job.json"  # in STAGING: {job_fingerprint, resolved_spec}
SHARD_GLOB = "model-?????-of-?????.safetensors"
MANIFEST_FILE = "rayquant-manifest.json"  # the commit: written last
CONFIG_FILE = "config.json"
MODEL_CARD_FILE = "README.md"
LOSS_PLOT_FILE = "loss-ratio.png"  # the model card's picture: GPTQ / RTN loss per layer (storage/loss_plot.py)
REPORT_FILE = "report.json"
RUN_STATS_FILE = "run-stats.json"  # timings and memory of the run that wrote the output; not in the manifest

#!/bin/bash
# Weak scaling of expert-parallel training: gpt-350m-moe with 32 experts on 1, 2 and 4 GPUs of one host,
# 8 sequences of 2048 tokens per GPU, eager, 20 steps each; tokens/s from the median step time of steps 5..19
# (metrics.parquet). Run from the repo root with the token file of traces/README.md:
#     bash benchmarks/expert_parallel_scaling.sh pysrc-v50257.bin /tmp/scaling
# Scaling efficiency with G GPUs = tokens/s(G) / (G x tokens/s(1)).
set -e
data=$1; out=${2:-/tmp/scaling}
for gpus in 1 2 4; do
  torchrun --nproc-per-node $gpus -m moe_trace train --model gpt-350m-moe --experts 32 --global-batch $((8 * gpus)) \
    --steps 20 --attention sdpa --moe-backend torch --no-compile --data "$data" \
    --out "$out/g$gpus" --eval-every 1000 --checkpoint-every 0 --seed 0
done
python - "$out" <<'PY'
import json, sys
import numpy as np
from moe_trace import trace
out = sys.argv[1]
rows = {}
for gpus in (1, 2, 4):
    metrics = trace.load_metrics(f"{out}/g{gpus}")
    step = float(np.median(metrics["step_time_s"][5:]))
    rows[gpus] = {"median_step_s": step, "tokens_per_s": float(metrics["tokens"][0]) / step}
for gpus, row in rows.items():
    row["efficiency"] = row["tokens_per_s"] / (gpus * rows[1]["tokens_per_s"])
print(json.dumps(rows, indent=1))
PY

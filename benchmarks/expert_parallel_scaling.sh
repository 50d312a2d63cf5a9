#!/bin/bash
# Weak scaling of expert-parallel training: gpt-350m-moe with 32 experts on 1, 2 and 4 GPUs of one host,
# 8 sequences of 2048 tokens per GPU, eager, 20 steps each; tokens/s from the median step time of steps 5..19
# (metrics.parquet). Run from the repo root with the token file of traces/README.md:
#     bash benchmarks/expert_parallel_scaling.sh pysrc-v50257.bin /tmp/scaling [benchmarks/results/expert_parallel_scaling.json]
# Scaling efficiency with G GPUs = tokens/s(G) / (G x tokens/s(1)). Writes the JSON (third argument) itself.
set -e
data=$1; out=${2:-/tmp/scaling}; json=${3:-benchmarks/results/expert_parallel_scaling.json}
command="bash benchmarks/expert_parallel_scaling.sh $*"
for gpus in 1 2 4; do
  torchrun --nproc-per-node $gpus -m moe_trace train --model gpt-350m-moe --experts 32 --global-batch $((8 * gpus)) \
    --steps 20 --attention sdpa --moe-backend torch --no-compile --data "$data" \
    --out "$out/g$gpus" --eval-every 1000 --checkpoint-every 0 --seed 0
done
python - "$out" "$json" "$command" <<'PY'
import datetime
import json
import platform
import sys

import numpy as np
import torch

from moe_trace import trace

out, path, command = sys.argv[1:]
results = []
for gpus in (1, 2, 4):
    metrics = trace.load_metrics(f"{out}/g{gpus}/metrics.parquet")
    step = float(np.median(metrics["step_time_s"][5:]))
    tokens = int(metrics["tokens"][0])
    results.append({"gpus": gpus, "global_batch": 8 * gpus, "tokens_per_step": tokens,
                    "median_step_s": round(step, 5), "tokens_per_s": round(tokens / step)})
for row in results:
    row["efficiency"] = round(row["tokens_per_s"] / (row["gpus"] * results[0]["tokens_per_s"]), 3)
record = {
    "benchmark": "benchmarks/expert_parallel_scaling.sh (weak scaling, 8 x 2048 tokens per GPU, eager, 20 steps, "
                 "median of steps 5..19)",
    "command": command,
    "model": "gpt-350m-moe --experts 32 (24 blocks, 12 MoE, top-1, expert parallel: 32/G experts per GPU)",
    "device": f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}",
    "torch": torch.__version__,
    "python": platform.python_version(),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "results": results,
}
with open(path, "w") as f:
    f.write(json.dumps(record, indent=2) + "\n")
print(json.dumps(results, indent=1))
print(path)
PY

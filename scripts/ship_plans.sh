#!/usr/bin/env bash
# The plans shipped with the default model (attnreuse/default_model/plans): DDIM and DPM-Solver++, 20 steps, four
# budgets, each searched on the default model's 8 calibration captions; the first search's profile of this device
# serves the others. Resumable: run it again to continue (searches keep their state in runs/plans). MEASURE= (empty)
# skips the latency measurement at the end of each search (for a busy machine; run again on a quiet one to measure).
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ATTNREUSE:-.venv/bin/attnreuse}
OUT=attnreuse/default_model/plans
STATE=${STATE:-runs/plans}
MEASURE=${MEASURE-yes}
first=""
for sampler in ddim dpm++; do
  for budget in 0.5 0.35 0.7 0.85; do
    name=$(echo "$sampler" | tr + p)20-$budget
    $A plan --effort full --sampler "$sampler" --steps 20 --budget "$budget" --calibration 8 --out "$OUT/$name.json" \
      --state "$STATE/$name.state.json" ${first:+--profile "$first"} ${MEASURE:---no-measure}
    first=${first:-$OUT/$name.json}
  done
done

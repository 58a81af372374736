#!/usr/bin/env bash
# The DiT default model's report (docs/RESULTS.md section 7): its card, plans searched for budgets 0.5 and 0.7 on
# the 8 calibration captions, then every reuse mode, the plans and the DiT-native peers against the full sampler
# at measured latency on 8 held-out captions. TIME_LIMIT: seconds of hill-climbing per plan search.
set -euo pipefail
cd "$(dirname "$0")/.."
A=${ATTNREUSE:-.venv/bin/attnreuse}
R=${RESULTS:-runs/results/dit}
T=${TIME_LIMIT:-300}
$A evaluate-default --model dit --count 50 --card --out "$R/card"
for budget in 0.5 0.7; do
  $A plan --effort full --model dit --sampler ddim --steps 20 --budget $budget --calibration 8 --time-limit "$T" \
    --out "$R/plan-$budget.json" --state "$R/plan-$budget.state.json" &
done
wait
$A eval --model dit --sampler ddim --steps 20 --count 8 --calibration 8 --repeats 3 --out "$R/eval" --methods \
  "full,steps:7,steps:10,steps:14,hurry:10,$R/plan-0.5.json,$R/plan-0.7.json,fbc:0.05,fbc:0.2,pab:2,taylorseer:3,fastercache,magcache:0.06,magcache:0.2"

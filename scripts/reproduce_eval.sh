#!/bin/bash
# The matched-latency report of docs/RESULTS.md (section 5): every method on the default model, 20-step DDIM and
# DPM-Solver++, 8 held-out captions x seeds, 5 timed rounds after a warm-up round. Run it on a quiet machine:
# the latencies are measured side by side in one process. Needs the PHAST schedules of reproduce_results.sh.
set -e
A=${ATTNREUSE:-.venv/bin/attnreuse}
R=${RESULTS:-runs/results}
$A eval --sampler ddim --steps 20 --count 8 --repeats 5 --methods paper,$R/phast_ddim20_r10.json --out $R/eval_ddim20
$A eval --sampler dpm++ --steps 20 --count 8 --repeats 5 --methods paper,$R/phast_dpm20_r10.json --out $R/eval_dpm20
# the quick preset's wall time (the bar: under 10 minutes on this CPU)
/usr/bin/time -f "quick preset: %e s wall" $A eval --out $R/eval_quick
# the planner's frontier (docs/RESULTS.md section 6): plan:B reads the shipped plans (searched on the 8 calibration
# captions, so --calibration 8), phast:10 is searched on the same 8
for s in ddim dpm++; do
  $A eval --sampler $s --steps 20 --count 8 --calibration 8 --repeats 3 --methods frontier \
    --out $R/frontier_$(echo $s | tr -d +)20
done

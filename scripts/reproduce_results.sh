#!/bin/bash
# Every figure of docs/RESULTS.md (reuse strategies on the shipped default model), in order; resumable
# (searches keep a state file; rerunning skips the schedules already scored). CPU: about an hour.
set -e
A=${ATTNREUSE:-.venv/bin/attnreuse}
R=${RESULTS:-runs/results}
mkdir -p $R
# 1. PHAST for 20-step DDIM, r = 10, on 8 calibration captions (seed 3), and HURRY/early/random/PHAST on
#    32 held-out captions and seeds (seed 0, never the calibration set)
$A search --sampler ddim --steps 20 --reuse 10 --calibration 8 --out $R/phast_ddim20_r10.json
$A compare --sampler ddim --steps 20 --reuse 10 --count 32 --schedules hurry,early,random:5,$R/phast_ddim20_r10.json --out $R/compare_ddim20_r10
# 2. PHAST against the exhaustive optimum for 10-step DPM-Solver++, r = 3 (all C(9, 3) = 84 schedules)
$A search --sampler dpm++ --steps 10 --reuse 3 --calibration 8 --out $R/phast_dpm10_r3.json
$A search --sampler dpm++ --steps 10 --reuse 3 --calibration 8 --exhaustive --out $R/exhaustive_dpm10_r3.json
# 3. the paper's analyses (20-step DDIM, 8 held-out captions)
$A analyze redundancy --steps 20 --count 8 --out $R/analysis
$A analyze sensitivity --steps 20 --count 8 --out $R/analysis
# 4. moving the DDIM-20 schedule by timestep to DPM-Solver++ 20 steps and to DDIM 25 steps (it keeps r = 10 there),
#    against searching there directly
$A search --sampler dpm++ --steps 20 --reuse 10 --calibration 8 --out $R/phast_dpm20_r10.json
$A compare --sampler dpm++ --steps 20 --reuse 10 --count 32 --schedules hurry,$R/phast_ddim20_r10.json,$R/phast_dpm20_r10.json --out $R/compare_dpm20_r10
$A search --sampler ddim --steps 25 --reuse 10 --calibration 8 --out $R/phast_ddim25_r10.json
$A compare --sampler ddim --steps 25 --reuse 10 --count 32 --schedules hurry,$R/phast_ddim20_r10.json,$R/phast_ddim25_r10.json --out $R/compare_ddim25_r10

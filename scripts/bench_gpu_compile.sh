#!/bin/bash
# torch.compile on CUDA first, since compiling an SD1.5 UNet takes over 30 s per graph there (docs/BENCHMARKS.md,
# "Compiled"): map mode alone is 4 graphs (stock; the handle's compute, store and reuse calls). Then the eager SD1.5
# b=2 run with more end-to-end rounds, if time is left.
# Dry run on CPU: DEVICE=cpu SD=tiny-sd PY=.venv/bin/python OUT=/tmp/x bash scripts/bench_gpu_compile.sh
SD=${SD:-sd15}
source scripts/gpu_env.sh
A="$PY -m attnreuse bench --device $DEVICE --arch $SD --batch 2 --out $OUT/bench"
timeout $(( $(left) - 120 )) $A --compile --modes map --e2e-modes none --repeats 3 2>&1 | grep -v "should be kept" | tee $OUT/compile.log
echo "== $(( $(date +%s) - T0 )) s"
timeout $(( $(left) )) $A --modes map,qk,output --e2e-modes map,qk,output --e2e-repeats 6 2>&1 | grep -v "should be kept" | tee $OUT/eager.log
echo "done $(( $(date +%s) - T0 )) s"

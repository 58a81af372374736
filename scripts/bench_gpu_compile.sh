#!/bin/bash
# The GPU check still missing after runs 1-3 (docs/BENCHMARKS.md): torch.compile on CUDA, first, since an SD1.5 UNet
# takes over 30 s per graph to compile there (run 3's compiled round 0, stock + map + output modes as 8 graphs, did
# not end in 265 s). Map mode alone is 4 graphs (stock; the handle's compute, store and reuse calls). Then the eager SD1.5
# b=2 run behind the bars, with more end-to-end rounds, if time is left. Results to $OUT (5 files).
# Dry run on CPU: DEVICE=cpu SD=tiny-sd PY=.venv/bin/python OUT=/tmp/x bash scripts/bench_gpu_compile.sh
SD=${SD:-sd15}
source scripts/gpu_env.sh
A="$PY -m attnreuse bench --device $DEVICE --arch $SD --batch 2 --out $OUT/bench"
timeout $(( $(left) - 120 )) $A --compile --modes map --e2e-modes none --repeats 3 2>&1 | grep -v "should be kept" | tee $OUT/compile.log
echo "== $(( $(date +%s) - T0 )) s"
timeout $(( $(left) )) $A --modes map,qk,output --e2e-modes map,qk,output --e2e-repeats 6 2>&1 | grep -v "should be kept" | tee $OUT/eager.log
echo "done $(( $(date +%s) - T0 )) s"

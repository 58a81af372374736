#!/bin/bash
# Where diffusers is not installed (the project's GPU image), carry its wheels in .whl/; elsewhere install attnreuse
# and skip the pip line.
# The GPU benchmarks of docs/BENCHMARKS.md: the kernel test on CUDA, then `attnreuse bench` for SD1.5 (b=2, 8) and
# SDXL (b=2 with end-to-end, b=8 per call), then a torch.compile run of SD1.5 b=2 with whatever time is left.
# Dry run on CPU: DEVICE=cpu SD=tiny-sd XL=tiny-sdxl PY=.venv/bin/python OUT=/tmp/x bash scripts/bench_gpu.sh
SD=${SD:-sd15}; XL=${XL:-sdxl}
source scripts/gpu_env.sh
timeout 90 $PY -m pytest -q -p no:cacheprovider tests/attention/test_kernels.py 2>&1 | tail -4 | tee $OUT/kernel_test.txt
A="$PY -m attnreuse bench --device $DEVICE --out $OUT/bench"; X=${EXTRA:-}
timeout $(( $(left) - 200 )) $A --arch $SD --batch 2,8 $X 2>&1 | grep -v "should be kept in float32" | tee $OUT/sd15.log
echo "== $(( $(date +%s) - T0 )) s"
timeout $(( $(left) - 110 )) $A --arch $XL --batch 2 --e2e-modes map,qk,output,auto --e2e-repeats 2 $X 2>&1 | grep -v "should be kept" | tee $OUT/sdxl.log
echo "== $(( $(date +%s) - T0 )) s"
timeout $(( $(left) - 80 )) $A --arch $XL --batch 8 --modes map,map-fp8,qk,output,auto --repeats 3 --e2e-modes none $X 2>&1 | grep -v "should be kept" | tee -a $OUT/sdxl.log
echo "== $(( $(date +%s) - T0 )) s"
timeout $(( $(left) )) $A --arch $SD --batch 2 --compile --modes map,output --e2e-modes none $X 2>&1 | grep -v "should be kept" | tail -20 | tee $OUT/compile.log
echo "done $(( $(date +%s) - T0 )) s"

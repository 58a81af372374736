#!/bin/bash
# Second, short GPU check: the (refactored) Triton kernels on CUDA, then SD1.5 b=2 with today's defaults and more
# end-to-end repeats.
T0=$(date +%s); export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/gpu.txt
timeout 60 python3 -m pytest -q -p no:cacheprovider tests/test_lean.py -k kernel 2>&1 | tail -3 | tee $OUT/kernel_test.txt
echo "== $(( $(date +%s) - T0 )) s"
timeout $(( 200 - ($(date +%s) - T0) )) python3 -m attnreuse bench --device cuda --arch sd15 --batch 2 --modes map,map-fp8,qk,output,auto --e2e-repeats 6 --out $OUT/bench 2>&1 | grep -v "should be kept"
echo "done $(( $(date +%s) - T0 )) s"

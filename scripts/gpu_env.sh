# Sourced by the GPU benchmark scripts: the clock and deadline, and on CUDA the carried wheels (.whl/) and the
# card's name in $OUT/gpu.txt. DEVICE=cpu (with PY=.venv/bin/python) dry-runs a script here.
T0=$(date +%s); DEADLINE=${DEADLINE:-540}; DEVICE=${DEVICE:-cuda}; PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
if [ "$DEVICE" = cuda ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $OUT/gpu.txt
fi
$PY -c "import torch, diffusers; print('torch', torch.__version__, 'diffusers', diffusers.__version__)" | tee -a $OUT/gpu.txt
left() { echo $(( DEADLINE - ($(date +%s) - T0) )); }

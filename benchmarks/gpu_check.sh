#!/usr/bin/env bash
# One command for a lent GPU machine (python3 with torch + nvcc already there, nothing to download):
# build against that torch, run the CUDA tests, run the GPU benchmark, print a table last.
# Must finish in under 5 minutes.   usage: bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 WEIGHTABLATE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
OUTDIR=${OUT:-/tmp/wa-gpu}
mkdir -p "$OUTDIR"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"
start=$(date +%s)
python3 setup.py build_ext --inplace 2>&1 | tail -3 | tee "$OUTDIR/build.log"
echo "build: $(( $(date +%s) - start )) s"
python3 -m pytest -q -m cuda tests/test_cuda.py -p no:cacheprovider 2>&1 | tail -15 | tee "$OUTDIR/tests.log"
python3 benchmarks/gpu_bench.py 2>&1 | tee "$OUTDIR/bench.log"
# With the time left (the whole check stays under 5 minutes): the small CUDA tests again under
# compute-sanitizer, one cudaMalloc per tensor so an out-of-bounds access is caught, and racecheck
# for the block reductions' shared memory.
left=$(( 280 - ($(date +%s) - start) ))
if command -v compute-sanitizer >/dev/null && [ "$left" -gt 40 ]; then
  for tool in memcheck racecheck; do
    PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout $(( left / 2 )) compute-sanitizer --tool $tool --error-exitcode 9 \
      python3 -m pytest -q -m cuda tests/test_cuda.py -k "shape0 or shape1 or 37-10-9-23 or (fused_scores_cuda and False and dtype1)" -p no:cacheprovider \
      > "$OUTDIR/$tool.log" 2>&1
    rc=$?
    echo "compute-sanitizer $tool: exit $rc ($(grep -c 'ERROR SUMMARY: 0 errors' "$OUTDIR/$tool.log") clean summaries)"
    tail -3 "$OUTDIR/$tool.log"
  done
else
  echo "compute-sanitizer: skipped (${left}s left or not installed)"
fi
echo "total: $(( $(date +%s) - start )) s"

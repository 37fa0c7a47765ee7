#!/usr/bin/env bash
# One-shot GPU check (about 8 minutes on one H100/H200): the GPU test tier, then the benchmark
# table at B = N in {8192, 32768, 131072}, D in {256, 768}, bf16 and fp32, against the naive
# PyTorch loss and the cuBLAS floor, with peak memory and TFLOPS. Writes
# benchmarks/results/cuda_<date>.md (and $OUT/ when set, for a remote run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import fastneg._C" 2>/dev/null; then
  $PY -m pip install --quiet pytest numpy
  $PY -m pip install --quiet --no-build-isolation -e .
fi
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

echo "== GPU test tier"
timeout 240 $PY -m pytest tests/test_gpu.py tests/test_correctness.py tests/test_torch_integration.py -q -x \
  -k "gpu or triton or auto or opcheck" 2>&1 | tail -20 | tee /tmp/fastneg_gpu_tests.txt

echo "== benchmark"
DATE=$(date -u +%Y-%m-%d)
OUTFILE=benchmarks/results/cuda_${DATE}.md
timeout 300 $PY benchmarks/bench_loss.py --device cuda --sizes 8192 32768 131072 --dims 256 768 \
  --dtypes bfloat16 float32 --out "$OUTFILE"
{ echo; echo "## GPU test tier"; echo; echo '```'; cat /tmp/fastneg_gpu_tests.txt; echo '```'; } >> "$OUTFILE"
if [ -n "${OUT:-}" ]; then cp "$OUTFILE" "$OUT/"; fi
echo "wrote $OUTFILE"

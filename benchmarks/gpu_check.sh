#!/usr/bin/env bash
# One-shot GPU check (about 8 minutes on one H100/H200): the GPU test tier, then the benchmark
# table at B = N in {8192, 32768, 131072}, D in {384, 768}, bf16 and fp32, against the naive
# PyTorch loss and the cuBLAS floor, with peak memory and TFLOPS; then `fastneg bench` against
# every peer (Inf-CL included when it installs). Writes benchmarks/results/cuda_<date>.md and
# benchmarks/results/cuda_sweep_<date>/ (copied to $OUT/ when set, for a remote run). The B = N = 32768
# rows are the shapes benchmarks/sass_cost.py models (benchmarks/results/sass_cost_<date>/): put the
# measured times beside the modelled ones.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! $PY -c "import fastneg" 2>/dev/null; then
  $PY -m pip install --quiet pytest numpy matplotlib tqdm
  $PY -m pip install --quiet --no-build-isolation --no-deps -e .   # pure Python; offline (no build isolation)
fi
# the peer Inf-CL, when it can be installed (CUDA only)
$PY -m pip install --quiet --no-deps inf-cl 2>/dev/null || echo "inf-cl not installed: its column stays empty"
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true

echo "== GPU test tier"
timeout 240 $PY -m pytest tests/backends/test_gpu.py tests/functional/test_correctness.py tests/backends/test_torch_integration.py tests/functional/test_symmetric.py tests/test_sampling.py tests/functional/test_debias.py tests/functional/test_estimators.py tests/functional/test_attract.py -q -x \
  -k "gpu or triton or auto or opcheck" 2>&1 | tail -20 | tee /tmp/fastneg_gpu_tests.txt

echo "== benchmark"
DATE=$(date -u +%Y-%m-%d)
OUTFILE=benchmarks/results/cuda_${DATE}.md
timeout 300 $PY benchmarks/bench_loss.py --device cuda --sizes 8192 32768 131072 --dims 384 768 \
  --dtypes bfloat16 float32 --out "$OUTFILE"
{ echo; echo "## GPU test tier"; echo; echo '```'; cat /tmp/fastneg_gpu_tests.txt; echo '```'; } >> "$OUTFILE"

echo "== peers sweep (fastneg bench: naive, compiled, chunked, sentence-transformers, Inf-CL, floor)"
timeout 200 $PY -m fastneg.tools.cli bench --device cuda --sizes 8192 32768 131072 --dims 768 --dtypes bfloat16 \
  --rules plain masked --rounds 1 --memory-budget 120 --out "benchmarks/results/cuda_sweep_${DATE}" \
  || echo "peers sweep stopped early (time limit)"
if [ -n "${OUT:-}" ] && [ -d "benchmarks/results/cuda_sweep_${DATE}" ]; then cp -r "benchmarks/results/cuda_sweep_${DATE}" "$OUT/"; fi
if [ -n "${OUT:-}" ]; then cp "$OUTFILE" "$OUT/"; fi
echo "wrote $OUTFILE"

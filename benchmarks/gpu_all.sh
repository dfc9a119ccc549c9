#!/usr/bin/env bash
# Every GPU figure in one run, well inside a 15-minute device lease (about 5-6 minutes on an H100/H200):
#   1. the layer-wise AdaMerging step at true ViT-B/32 and ViT-L/14 shapes, 8 tasks x 16 images,
#      fp32 and bf16 autocast, against the floor (one forward+backward of one model, same batch);
#   2. the CART merge (8 tasks, B/32 shapes);
#   3. Ties (8 tasks, B/32 shapes).
# Weights and images are random (the random-b32 / random-l14 shapes); speed does not depend on values.
# Writes benchmarks/RESULTS.md naming the device. On a machine without CUDA it runs the same script on
# the CPU with the tiny model only, so the script itself is exercised (those are not GPU figures).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
OUT=${OUT:-benchmarks/RESULTS.md}
export OMP_WAIT_POLICY=PASSIVE
if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  DEV=cuda; MODELS=b32,l14; NAME=$($PY -c "import torch; print(torch.cuda.get_device_name(0))")
else
  DEV=cpu; MODELS=tiny; NAME="CPU ($(nproc) cores) - NOT GPU figures: the GPU ones are still to be taken"
fi
{
  echo "# Benchmark results"
  echo
  echo "Device: ${NAME}. torch $($PY -c 'import torch; print(torch.__version__)'). $(date -u +%Y-%m-%d)."
  echo "Command: \`bash benchmarks/gpu_all.sh\`"
  echo
  echo "## Layer-wise AdaMerging step (8 tasks x 16 images) vs floor"
  echo '```'
  timeout 300 $PY benchmarks/adaptation.py --device "$DEV" --models "$MODELS" --iters 10 --warmup 3 2>&1 || echo "(adaptation: failed or timed out)"
  echo '```'
  echo "## CART merge (8 tasks, ViT-B/32 shapes)"
  echo '```'
  if [ "$DEV" = cuda ]; then timeout 150 $PY benchmarks/cart.py --device cuda 2>&1 || echo "(cart: failed or timed out)"; else echo "(skipped on CPU: see benchmarks/README.md)"; fi
  echo '```'
  echo "## Ties (8 tasks, ViT-B/32 shapes)"
  echo '```'
  if [ "$DEV" = cuda ]; then timeout 120 $PY benchmarks/ties.py 2>&1 || echo "(ties: failed or timed out)"; else echo "(skipped on CPU: see benchmarks/README.md)"; fi
  echo '```'
} | tee "$OUT.tmp"
mv "$OUT.tmp" "$OUT"

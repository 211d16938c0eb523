#!/usr/bin/env bash
# One command for a CUDA machine: build fastclip._C with its CUDA kernels from this checkout, run the
# GPU tests and the loss benchmark, and keep the raw log, the JSON and the plot under
# benchmarks/results/<device>/ (or $OUT when set, as on a lent device machine).
set -uo pipefail
cd "$(dirname "$0")/.."
device=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
dest=${OUT:-benchmarks/results/$device}
mkdir -p "$dest"
log="$dest/gpu_check.log"
{
  echo "== $(date -u +%FT%TZ) git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || true
  nvcc --version | tail -n 2
  python -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  FASTCLIP_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-8} python -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -n 3
  python -m fastclip info
  python -m pytest -m cuda -q -p no:cacheprovider 2>&1
  echo "pytest -m cuda exit code: $?"
  python benchmarks/bench_loss.py --device cuda --out "$dest" "$@" 2>&1
  echo "bench_loss exit code: $?"
} 2>&1 | tee "$log"

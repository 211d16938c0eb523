#!/usr/bin/env bash
# Every benchmark on this machine's CPU with its default CPU sizes: the raw log, JSON and plots go to
# benchmarks/results/cpu-<cores>core/ (or $OUT). Run it on a quiet machine: CPU timings are easily disturbed.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/results/cpu-$(nproc)core}
mkdir -p "$dest"
{
  echo "== $(date -u +%FT%TZ) git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  grep -m1 "model name" /proc/cpuinfo || true
  echo "cores: $(nproc)"
  python -m fastclip info
  for bench in bench_loss bench_attention bench_model bench_train bench_tokenizer; do
    start=$SECONDS
    echo "== $bench"
    device_flag=(--device cpu)
    [ "$bench" = bench_tokenizer ] && device_flag=()  # the tokenizer runs on the CPU only
    python "benchmarks/$bench.py" "${device_flag[@]}" --out "$dest" 2>&1
    echo "$bench exit code: $? ($((SECONDS - start)) s)"
  done
} 2>&1 | tee "$dest/cpu_bench.log"

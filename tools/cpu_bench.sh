#!/usr/bin/env bash
# Every benchmark on this machine's CPU with its default CPU sizes: the raw log, JSON and plots go to
# benchmarks/results/cpu-<cores>core/ (or $OUT). Run it on a quiet machine: CPU timings are easily disturbed.
# Arguments pick a subset of the steps (default: all, logged to cpu_bench.log; a subset logs to
# cpu_bench_<steps>.log so the full log is kept), e.g. `tools/cpu_bench.sh bench_loss_family`.
# Steps: bench_loss (CLIP: bench_loss.json), bench_loss_family (SigLIP and SupCon: bench_loss_siglip.json,
# bench_loss_supcon.json), bench_attention, bench_model, bench_train, bench_tokenizer.
set -uo pipefail
cd "$(dirname "$0")/.."
dest=${OUT:-benchmarks/results/cpu-$(nproc)core}
mkdir -p "$dest"
all=(bench_loss bench_loss_family bench_attention bench_model bench_train bench_tokenizer)
steps=("${@:-${all[@]}}")
log="$dest/cpu_bench.log"
[ $# -gt 0 ] && log="$dest/cpu_bench_$(IFS=_; echo "$*").log"
{
  echo "== $(date -u +%FT%TZ) git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  grep -m1 "model name" /proc/cpuinfo || true
  echo "cores: $(nproc); load average: $(cut -d' ' -f1-3 /proc/loadavg)"
  python -m fastclip info
  for step in "${steps[@]}"; do
    start=$SECONDS
    echo "== $step"
    bench=$step args=(--device cpu)
    case $step in
      bench_loss) args+=(--loss clip) ;;
      bench_loss_family) bench=bench_loss args+=(--loss siglip,supcon) ;;
      bench_tokenizer) args=() ;;  # the tokenizer runs on the CPU only
    esac
    python "benchmarks/$bench.py" "${args[@]}" --out "$dest" 2>&1
    echo "$step exit code: $? ($((SECONDS - start)) s)"
  done
  echo "load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)"
} 2>&1 | tee "$log"

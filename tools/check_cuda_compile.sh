#!/usr/bin/env bash
# Compile (not run) every CUDA source with nvcc, as CI does on machines without a GPU, and report what
# the kernels cost in registers, spills and shared memory.
#  - kernels/*.cu: plain CUDA C++ with the flags torch's build adds, for the targets of setup.py's
#    default TORCH_CUDA_ARCH_LIST "8.0;9.0+PTX": sm_80 and sm_90 code plus compute_90 PTX. That PTX is
#    then assembled for sm_100 and sm_120 as the driver's JIT does on those GPUs (no "no kernel image").
#  - ptxas -v on all of it: a table per architecture (tools/ptxas_report.py). A spill in a bf16/fp16
#    kernel of the shipped code (sm_80, sm_90) fails the check; fp32 spills and those of the PTX
#    targets, which the driver's own JIT decides, are reported.
#  - csrc/cuda/*.cu: the ATen glue, against the installed torch's headers, for sm_80 only (it has no device
#    code; each more target only parses the headers again). A CPU build of torch lacks one generated
#    header of c10/cuda (cuda_cmake_macros.h); a one-line stand-in makes the check possible.
# The four compiles run in parallel: about a minute on two idle cores.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
PTXAS=${PTXAS:-ptxas}
for tool in "$NVCC" "$PTXAS"; do
  command -v "$tool" >/dev/null || { echo "$tool not found: set NVCC/PTXAS or put the CUDA toolkit on PATH" >&2; exit 1; }
done
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(-O3 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Ikernels -Icsrc)
targets=(-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=[sm_90,compute_90])
jit_archs=(sm_100 sm_120)

compile_kernels() {  # $1: kernels/x.cu -> $out/x.ptxas.log (+ one log per PTX target)
  local name keep
  name=$(basename "$1" .cu)
  keep="$out/keep-$name"
  mkdir -p "$keep"
  "$NVCC" -std=c++17 "${common[@]}" "${targets[@]}" -Werror all-warnings -Xptxas -v --keep --keep-dir "$keep" \
    -c "$1" -o "$out/$name.o" 2> "$out/$name.ptxas.log" || { cat "$out/$name.ptxas.log" >&2; return 1; }
  for arch in "${jit_archs[@]}"; do
    "$PTXAS" -arch="$arch" -v "$keep/$name.compute_90.ptx" -o /dev/null 2> "$out/$name.$arch.jit.log" \
      || { cat "$out/$name.$arch.jit.log" >&2; return 1; }
  done
}

mkdir -p "$out/shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
read -r -a torch_includes < <(python -c \
  "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
python_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
compile_glue() {  # $1: csrc/cuda/x.cu; its warnings are shown, not fatal
  local log="$out/$(basename "$1").log"
  "$NVCC" -std=c++20 "${common[@]}" -gencode=arch=compute_80,code=sm_80 -I"$out/shim" "${torch_includes[@]}" \
    -I"$python_include" -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions -c "$1" -o "$out/$(basename "$1").o" \
    2> "$log" || { cat "$log" >&2; return 1; }
  cat "$log" >&2
}

pids=() names=()
for src in csrc/cuda/*.cu; do compile_glue "$src" & pids+=($!) names+=("$src (ATen glue, sm_80)"); done
for src in kernels/*.cu; do
  compile_kernels "$src" & pids+=($!) names+=("$src (sm_80, sm_90, compute_90 PTX -> ${jit_archs[*]})")
done
failed=0
for i in "${!pids[@]}"; do
  if wait "${pids[$i]}"; then echo "nvcc: ${names[$i]}: ok"
  else echo "nvcc: ${names[$i]}: FAILED" >&2; failed=1; fi
done
[ "$failed" = 0 ] || exit 1
echo "all CUDA sources compile"
python tools/ptxas_report.py --fail-on sm_80,sm_90 --jit "${jit_archs[*]}" "$out"/*.ptxas.log "$out"/*.jit.log

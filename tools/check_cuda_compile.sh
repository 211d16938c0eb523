#!/usr/bin/env bash
# Compile (not run) every CUDA source with nvcc, as CI does on machines without a GPU.
#  - kernels/*.cu: plain CUDA C++, for sm_80 and sm_90a, with the flags torch's build adds.
#  - csrc/*.cu: the ATen glue, against the installed torch's headers. A CPU build of torch lacks one
#    generated header of c10/cuda (cuda_cmake_macros.h); a one-line stand-in makes the check possible.
set -euo pipefail
cd "$(dirname "$0")/.."
NVCC=${NVCC:-nvcc}
command -v "$NVCC" >/dev/null || { echo "nvcc not found: set NVCC or put the CUDA toolkit on PATH" >&2; exit 1; }
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
common=(-O3 --expt-relaxed-constexpr -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
        -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__ -Ikernels -Icsrc
        -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a)
for src in kernels/*.cu; do
  echo "nvcc: $src (sm_80, sm_90a)"
  "$NVCC" -std=c++17 "${common[@]}" -Werror all-warnings -c "$src" -o "$out/$(basename "$src").o"
done
mkdir -p "$out/shim/c10/cuda/impl"
printf '#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n' > "$out/shim/c10/cuda/impl/cuda_cmake_macros.h"
read -r -a torch_includes < <(python -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
python_include=$(python -c "import sysconfig; print(sysconfig.get_paths()['include'])")
for src in csrc/*.cu; do
  echo "nvcc: $src (ATen glue, sm_80, sm_90a)"
  "$NVCC" -std=c++20 "${common[@]}" -I"$out/shim" "${torch_includes[@]}" -I"$python_include" \
    -diag-suppress 3306 -Xcompiler -Wno-c++20-extensions -c "$src" -o "$out/$(basename "$src").o"
done
echo "all CUDA sources compile"

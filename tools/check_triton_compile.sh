#!/usr/bin/env bash
# Compile every Triton attention kernel for sm_80 and sm_90 (no GPU needed) with two Triton versions: the
# installed one (CI installs the newest) and 3.6.0, the version of the project's GPU image. Fails on a
# compile error, shared memory over the limit or a bf16/fp16 register spill (tools/check_triton_compile.py).
# Triton 3.6.0 is installed once into fastclip's cache directory (see tools/triton36_dir.sh), or
# TRITON36_DIR names an unpacked copy.
# Extra arguments go to the Python check, e.g. --jobs 4 or --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/triton36_dir.sh  # sets triton36
status=0
PYTHONPATH="$triton36${PYTHONPATH:+:$PYTHONPATH}" python tools/check_triton_compile.py "$@" || status=1
python tools/check_triton_compile.py "$@" || status=1
exit $status

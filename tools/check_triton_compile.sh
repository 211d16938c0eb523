#!/usr/bin/env bash
# Compile every Triton attention kernel for sm_80 and sm_90 (no GPU needed) with two Triton versions: the
# installed one (CI installs the newest) and 3.6.0, the version of the project's GPU image. Fails on a
# compile error, shared memory over the limit or a bf16/fp16 register spill (tools/check_triton_compile.py).
# Triton 3.6.0 is installed once into .cache/triton-3.6.0, or TRITON36_DIR names an unpacked copy.
# Extra arguments go to the Python check, e.g. --jobs 4 or --quick.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${TRITON36_DIR:-}" ]; then
  triton36=$TRITON36_DIR
  [ -f "$triton36/triton/__init__.py" ] || { echo "TRITON36_DIR=$triton36 holds no triton package" >&2; exit 1; }
else
  triton36=$PWD/.cache/triton-3.6.0
  if [ ! -f "$triton36/triton/__init__.py" ]; then
    echo "installing triton 3.6.0 into $triton36"
    rm -rf "$triton36.partial" "$triton36"
    # --no-deps: only the compiler is needed from it; torch and the rest come from the environment.
    python -m pip install -q --no-deps --target "$triton36.partial" triton==3.6.0
    mv "$triton36.partial" "$triton36"  # only a complete install takes the final name
  fi
fi
status=0
PYTHONPATH="$triton36${PYTHONPATH:+:$PYTHONPATH}" python tools/check_triton_compile.py "$@" || status=1
python tools/check_triton_compile.py "$@" || status=1
exit $status

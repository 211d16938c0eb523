#!/usr/bin/env bash
# The attention tests again under the interpreter of Triton 3.6.0, the version on the project's GPU image
# (the installed Triton, the newest, runs them in the test suite). Triton 3.6's interpreter turns
# 1-element arrays into ints, which numpy refuses from 2.4 on, so it runs beside numpy 2.3; compiled
# kernels on a GPU never use the interpreter. Both are installed once under .cache/ (git-ignored).
set -euo pipefail
cd "$(dirname "$0")/.."
install() {  # install DIR SPEC: pip --target into DIR unless it is there already
  if [ ! -d "$1" ]; then
    rm -rf "$1.partial"
    python -m pip install -q --no-deps --target "$1.partial" "$2"
    mv "$1.partial" "$1"  # only a complete install takes the final name
  fi
}
install "${TRITON36_DIR:-.cache/triton-3.6.0}" triton==3.6.0
install .cache/numpy-2.3 numpy==2.3.5
export PYTHONPATH=${TRITON36_DIR:-.cache/triton-3.6.0}:.cache/numpy-2.3${PYTHONPATH:+:$PYTHONPATH}
python -c "import numpy, triton; assert triton.__version__ == '3.6.0', triton.__version__; print('triton', triton.__version__, 'numpy', numpy.__version__)"
python -m pytest tests/test_attention.py tests/test_attention_lengths.py -m "not cuda" -q -p no:cacheprovider "$@"

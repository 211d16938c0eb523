#!/usr/bin/env bash
# The attention tests again under the interpreter of Triton 3.6.0, the version on the project's GPU image
# (the installed Triton, the newest, runs them in the test suite). Triton 3.6's interpreter turns
# 1-element arrays into ints, which numpy refuses from 2.4 on, so it runs beside numpy 2.3; compiled
# kernels on a GPU never use the interpreter. Both are installed once into fastclip's cache directory.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/triton36_dir.sh  # sets triton36 and fastclip_cache
numpy23=$fastclip_cache/tools/numpy-2.3.5
pip_target_once "$numpy23" numpy==2.3.5
export PYTHONPATH=$triton36:$numpy23${PYTHONPATH:+:$PYTHONPATH}
python -c "import numpy, triton; assert triton.__version__ == '3.6.0', triton.__version__; print('triton', triton.__version__, 'numpy', numpy.__version__)"
python -m pytest tests/test_attention.py tests/test_attention_lengths.py -m "not cuda" -q -p no:cacheprovider "$@"

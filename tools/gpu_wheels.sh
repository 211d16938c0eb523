#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels that the GPU image lacks, into .whl/ (ignored
# by git): the device machine reaches no registry, so they travel with the checkout (carry ".whl") and
# tools/gpu_check.sh installs them first. Python 3.12, x86-64 Linux, as on the GPU image.
#   ftfy, wcwidth     the tokenizer's text cleaning (fastclip imports without them; non-ASCII text needs them)
#   open-clip-torch   open_clip's tokenizer, the reference the tokenizer tests compare against
#   clip-anytorch     OpenAI's original tokenizer, the reference for OpenAI's special-token spelling
#   inf-cl            Inf-CL, the tiled contrastive loss the loss benchmark compares against
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=(ftfy==6.3.1 wcwidth==0.9.4 open-clip-torch==3.3.0 clip-anytorch==2.6.0 inf-cl==1.2.1)
rm -rf .whl && mkdir -p .whl
# --no-deps: each package's own needs (torch, torchvision, ...) are on the GPU image already.
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
ls -1 .whl
echo "$(ls .whl | wc -l) wheels in .whl ($(du -sh .whl | cut -f1)); carry \".whl\" to the device machine"

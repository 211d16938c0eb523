#!/usr/bin/env bash
# The GPU check, for a CUDA machine that reaches no package registry: install the wheels carried in .whl/
# (tools/gpu_wheels.sh), build fastclip._C with its CUDA kernels from this checkout, then run the steps, the
# most valuable evidence first:
#   build        FASTCLIP_FORCE_CUDA=1 editable build, then `python -m fastclip info`
#   tests        pytest -m cuda on the loss kernels (stops after a few failures)
#   sanitizer    compute-sanitizer memcheck and racecheck on small CUDA loss tests
#   loss         bench_loss: naive, Inf-CL, tiled torch and both paths of the CUDA op, bf16 and fp32, D = 512, 768
#   profile      ncu profiles of both CUDA loss paths' kernels at N = 65536, D = 768, bf16
#   chunk_sweep  the chunked path's time at N = 65536 for scratch budgets from 16 to 512 MiB
#   attention_tests  pytest -m cuda on the Triton attention and the models
#   attention_profile  kernel time against wall time per attention call (tools/profile_attention.py)
#   siglip attention train model   the other benchmarks, each cut at its time limit
# Each step runs under a time limit printed in the log; a step cut at its limit (exit 124) keeps what it
# wrote; LIMIT_<step>=SECONDS overrides a step's limit. STEPS picks and orders steps, e.g. STEPS="build tests sanitizer loss profile" for one 10-minute
# command and STEPS="attention_tests siglip attention train model" for a second one on the warm machine.
# Outputs go to benchmarks/results/<device>/ (DEVICE_NAME overrides <device>). When $OUT is set (a lent
# device machine, which returns at most 8 files) the live log is $OUT/gpu_check.log and, after every step,
# $OUT/results.tar.gz holds the whole results folder, so a command killed midway still returns its data.
# LOSS_TESTS_ONLY replaces the tests step's list. Extra arguments go to the loss step's bench_loss.py.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
steps=" ${STEPS-build tests sanitizer loss profile chunk_sweep attention_tests attention_profile siglip attention train model} "
want() { [[ $steps == *" $1 "* ]]; }

# Wheels the GPU image lacks, installed beside it exactly as the device README shows (no registry there).
# Installed once per machine: several checks may run side by side (say, correctness tests beside the build).
if compgen -G ".whl/*.whl" >/dev/null; then
  [[ -d /tmp/fastclip-site ]] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fastclip-site .whl/*.whl \
    || { echo "installing the wheels in .whl failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/fastclip-site${PYTHONPATH:+:$PYTHONPATH}
fi

device=${DEVICE_NAME:-$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))" 2>/dev/null || echo unknown)}
results=benchmarks/results/$device
mkdir -p "$results"
log=${OUT:+$OUT/}gpu_check${STEPS:+_${STEPS// /_}}.log
[[ -n ${OUT:-} ]] || log=$results/$log

# snapshot: the results folder into $OUT/results.tar.gz (atomically), when running on a device machine.
snapshot() {
  [[ -n ${OUT:-} ]] || return 0
  cp "$log" "$results/" 2>/dev/null
  tar -czf "$OUT/results.tar.gz.part" -C benchmarks/results "$device" && mv "$OUT/results.tar.gz.part" "$OUT/results.tar.gz"
}

# step NAME LIMIT_S COMMAND...: run under a time limit (exit 124 when cut), report, snapshot. COMMAND is a
# program, not a shell function: timeout execs it.
step() {
  local name=$1 limit_var="LIMIT_$1" start=$SECONDS rc
  local limit=${!limit_var:-$2}  # LIMIT_<step>=SECONDS overrides the default, to fit a short lease
  shift 2
  echo "== step $name (limit ${limit}s, $SECONDS s so far): $*"
  timeout -k 10 "$limit" "$@" 2>&1
  rc=$?
  echo "== step $name: exit code $rc in $((SECONDS - start)) s"
  snapshot
  return $rc
}

# The loss tests first (the kernels this project exists for), then the attention and model tests.
LOSS_TESTS=(tests/test_contrastive_cuda.py tests/test_chunked_loss_path.py tests/test_contrastive_loss.py
            tests/test_contrastive_op.py tests/test_loss_family.py tests/test_loss_gradient_rounding.py tests/test_properties.py
            tests/test_properties_family.py tests/test_sigmoid_one_pass.py tests/test_device_sync.py)
[[ -z ${LOSS_TESTS_ONLY-} ]] || read -ra LOSS_TESTS <<< "$LOSS_TESTS_ONLY"  # e.g. the node ids that failed last time
# Small, fast CUDA tests of both kernels' forward and backward, for the sanitizers (10-100x slower there).
SANITIZED=(tests/test_contrastive_loss.py tests/test_loss_family.py tests/test_sigmoid_one_pass.py -m cuda -q
           -p no:cacheprovider -x -k "lse_rectangular or identical_rows_tie or masked_lse_matches_dense or pairwise_sigmoid_rows_match_dense or (one_pass_matches and diagonal and float32 and not many)")

{
  echo "== $(date -u +%FT%TZ) git $(git rev-parse HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (dirty)')"
  echo "device: $device; steps:$steps"
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv 2>&1 || true
  nvcc --version 2>&1 | tail -n 2 || true
  python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python3 -c "import triton; print('triton', triton.__version__)" 2>&1
  python3 -c "import ftfy, fastclip; print('ftfy', ftfy.__version__, 'from', ftfy.__file__, '| fastclip', fastclip.__version__, 'from', fastclip.__file__)" 2>&1

  if want build; then
    # --no-deps: the image has every dependency (ftfy comes from .whl); never reach for a registry.
    FASTCLIP_FORCE_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} step build 420 \
      python3 -m pip install --no-build-isolation --no-deps --no-index -e . && step info 60 python3 -m fastclip info
  fi
  if want tests; then
    # up to 5 failures rather than -x: one GPU run should show every broken kernel, not just the first
    step tests 200 python3 -m pytest "${LOSS_TESTS[@]}" -m cuda -q -p no:cacheprovider --maxfail=5
  fi
  if want sanitizer; then
    # memcheck on both paths of the CUDA loss; racecheck on the fused one (the chunked epilogue shares no memory)
    for check in memcheck:chunked memcheck:fused racecheck:fused; do
      tool=${check%%:*} path=${check##*:}
      if command -v compute-sanitizer >/dev/null; then
        # no caching allocator: out-of-bounds accesses inside PyTorch's pooled segments would go unseen
        FASTCLIP_CUDA_LOSS_PATH=$path PYTORCH_NO_CUDA_MEMORY_CACHING=1 step "sanitizer_${tool}_$path" 75 \
          compute-sanitizer --tool "$tool" --error-exitcode 1 --target-processes all python3 -m pytest "${SANITIZED[@]}"
      else
        echo "== step sanitizer_$tool: compute-sanitizer not found"
      fi
    done
  fi
  if want loss; then
    # both CUDA paths by name ("cuda" would time the default one twice)
    step loss 150 python3 benchmarks/bench_loss.py --device cuda --out "$results" --loss clip --dtypes bf16,fp32 \
      --dims 512,768 --sizes 4096,16384,65536 --budget-s 2 --backends naive,infcl,torch,cuda-fused,cuda-chunked "$@"
  fi
  if want profile; then
    if command -v ncu >/dev/null; then
      # name:path:kernel regex:launches, inside tools/profile_loss.py's one profiled forward + backward: the
      # chunked path's first forward GEMM and epilogue, its backward epilogue, and the fused path's two kernels
      for target in "chunked_forward:chunked:chunk_forward_kernel|gemm|xmma|cutlass:2" \
                    "chunked_backward:chunked:chunk_loss_backward_kernel:1" \
                    "fused_forward:fused:lse_forward_kernel:1" "fused_backward:fused:loss_backward_kernel:1"; do
        IFS=: read -r name path regex launches <<< "$target"
        rep=$results/ncu_loss_${name}_n65536_d768_bf16
        FASTCLIP_CUDA_LOSS_PATH=$path step "profile_$name" 90 ncu --profile-from-start off --kernel-name "regex:$regex" \
          --launch-count "$launches" --section SpeedOfLight --section MemoryWorkloadAnalysis \
          --section ComputeWorkloadAnalysis --section Occupancy --section LaunchStats --section WarpStateStats \
          -f -o "$rep" python3 tools/profile_loss.py --n 65536 --dim 768 --dtype bf16 \
          && ncu --import "$rep.ncu-rep" --page details > "$rep.txt" 2>&1; cat "$rep.txt" 2>/dev/null
      done
    else
      echo "== step profile: ncu not found"
    fi
    step profile_timing 60 python3 tools/profile_loss.py --n 65536 --dim 768 --dtype bf16 --reps 5
  fi
  if want chunk_sweep; then
    # The chunked path's scratch budget: does keeping the similarity chunk in L2 (60 MB on an H200) beat
    # larger GEMMs? One timing line per budget, N = 65536, D = 768, bf16.
    for mib in 16 32 64 128 256 512; do
      FASTCLIP_CUDA_LOSS_PATH=chunked FASTCLIP_LOSS_CHUNK_BYTES=$((mib << 20)) step "chunk_sweep_${mib}MiB" 40 \
        python3 tools/profile_loss.py --n 65536 --dim 768 --dtype bf16 --reps 5
    done
  fi
  if want attention_tests; then
    step attention_tests 240 python3 -m pytest tests/test_attention*.py tests/test_model.py -m cuda -q -p no:cacheprovider --maxfail=5
  fi
  # Kernel time against wall time per attention call (host-bound or kernel-bound?), text and ViT-B/16 shapes
  if want attention_profile; then
    for shape in text vit_b16; do
      step "attention_profile_$shape" 60 python3 tools/profile_attention.py --shape "$shape" \
        --competitors "fastclip,sdpa,sdpa_flash$([[ $shape == text ]] && echo ,fastclip_dense)"
    done
  fi
  # SigLIP fused vs eager forward+backward in bf16 at D = 768 up to N = 65536 (eager peaks near 18 bytes per
  # logit in bf16, ~77 GiB at 65536^2, inside an H200's 139 GiB; an OOM is recorded as such, not fatal)
  want siglip && step siglip 150 python3 benchmarks/bench_loss.py --device cuda --out "$results" --loss siglip --dtypes bf16 --dims 768 --sizes 4096,16384,65536 --budget-s 2
  # the shapes with a target first (the JSON is rewritten after each shape, so a cut-off run keeps them)
  want attention && step attention 180 python3 benchmarks/bench_attention.py --device cuda --out "$results" --dtypes bf16 --warmup 3 --reps 10 --shapes vit_b16,vit_l14,text
  # ViT-B-16 bf16 training step, each side's batch swept 64, 128, ... until out of memory (<= 4096)
  want train && step train 210 python3 benchmarks/bench_train.py --device cuda --out "$results" --model ViT-B-16 --precision bf16 --max-batch 4096 --budget-s 4
  want model && step model 120 python3 benchmarks/bench_model.py --device cuda --out "$results" --models ViT-B-16,ViT-L-14 --precision bf16 --batch-sizes 256,1024 --budget-s 2
  echo "== done in $SECONDS s"
} 2>&1 | tee "$log"
snapshot

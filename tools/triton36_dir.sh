# Sourced by the Triton checks: sets `triton36` to a directory holding Triton 3.6.0, the version of the
# project's GPU image ($TRITON36_DIR if set, else installed once into fastclip's cache directory, outside
# the checkout, so a fresh clone on the same machine reuses it), and `fastclip_cache` to fastclip's cache
# directory (fastclip.checkpoint.pretrained.cache_dir).
fastclip_cache=$(python -c "from fastclip.checkpoint.pretrained import cache_dir; print(cache_dir())")

pip_target_once() {  # pip_target_once DIR SPEC: pip install --target DIR SPEC unless DIR is there already
  if [ ! -d "$1" ]; then
    echo "installing $2 into $1"
    rm -rf "$1.partial"
    # --no-deps: only the package itself is needed; torch and the rest come from the environment.
    python -m pip install -q --no-deps --target "$1.partial" "$2"
    mv "$1.partial" "$1"  # only a complete install takes the final name
  fi
}

if [ -n "${TRITON36_DIR:-}" ]; then
  triton36=$TRITON36_DIR
  [ -f "$triton36/triton/__init__.py" ] || { echo "TRITON36_DIR=$triton36 holds no triton package" >&2; exit 1; }
else
  triton36=$fastclip_cache/tools/triton-3.6.0
  pip_target_once "$triton36" triton==3.6.0
fi

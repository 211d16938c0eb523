"""Build fastclip and its extension `fastclip._C`.

The C++ sources (`csrc/**/*.cpp`: the module in csrc/module.cpp, op schemas and argument checks in
csrc/ops/, shared helpers in csrc/common.cpp, CPU kernels in csrc/cpu/) are always built. The CUDA sources
(`kernels/*.cu` device code + `csrc/cuda/*.cu` ATen glue) are added when a CUDA build of PyTorch and a CUDA
toolkit are present, never because a GPU happens to be visible, so a GPU-less machine can cross-compile.
Sources include each other by paths relative to csrc/ (e.g. "ops/contrastive_lse.h") or kernels/.

Environment switches:
  FASTCLIP_SKIP_EXTENSION=1   build no extension at all (pure-PyTorch install)
  FASTCLIP_SKIP_CUDA=1        build the C++ extension only
  FASTCLIP_FORCE_CUDA=1       fail instead of silently skipping CUDA when it cannot be built
  TORCH_CUDA_ARCH_LIST        CUDA architectures (default "8.0;9.0+PTX": A100 and H100/H200 code, plus
                              PTX that newer GPUs, sm_100/sm_120, compile at load instead of failing
                              with "no kernel image")
  MAX_JOBS                    parallel compile jobs (honoured by torch's BuildExtension / ninja)
  DEBUG=1                     -O0 -g, with device debug info (-G) in CUDA sources
"""

from __future__ import annotations

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _extensions() -> tuple[list, dict]:
    if _flag("FASTCLIP_SKIP_EXTENSION"):
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    debug = _flag("DEBUG")
    cxx_flags = ["-O0", "-g"] if debug else ["-O3"]
    cxx_flags += ["-fopenmp"]  # the C++ standard is torch's choice (C++17 or C++20 by version)
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))

    cuda_possible = torch.version.cuda is not None and CUDA_HOME is not None
    build_cuda = cuda_possible and not _flag("FASTCLIP_SKIP_CUDA")
    if _flag("FASTCLIP_FORCE_CUDA") and not build_cuda:
        raise RuntimeError(
            "FASTCLIP_FORCE_CUDA=1 but the CUDA extension cannot be built: "
            f"torch.version.cuda={torch.version.cuda!r}, CUDA_HOME={CUDA_HOME!r}, "
            f"FASTCLIP_SKIP_CUDA={os.environ.get('FASTCLIP_SKIP_CUDA')!r}"
        )
    print(f"fastclip setup: building C++ extension, CUDA={'yes' if build_cuda else 'no'}", file=sys.stderr)

    if build_cuda:
        os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("kernels/*.cu"))
        nvcc_flags = ["-O0", "-G", "-g"] if debug else ["-O3", "-lineinfo"]
        nvcc_flags += ["--expt-relaxed-constexpr", "-DFASTCLIP_WITH_CUDA"]
        ext = CUDAExtension(
            "fastclip._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc"), os.path.join(ROOT, "kernels")],
            extra_compile_args={"cxx": cxx_flags + ["-DFASTCLIP_WITH_CUDA"], "nvcc": nvcc_flags},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    else:
        ext = CppExtension(
            "fastclip._C",
            sources,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=["-fopenmp"],
        )
    return [ext], {"build_ext": _incremental(BuildExtension.with_options(use_ninja=True))}


def _incremental(build_ext: type) -> type:
    """build_ext with its object files in build/ (git-ignored) instead of pip's temporary folder, so that
    ninja recompiles only the sources that changed when the package is installed again."""

    class IncrementalBuildExt(build_ext):
        def finalize_options(self) -> None:
            super().finalize_options()
            self.build_temp = os.path.join(ROOT, "build", f"temp-{sys.implementation.cache_tag}")

        def build_extension(self, ext) -> None:
            # ninja writes each object (and its .d file) into a folder per source folder, which not every
            # setuptools version creates first
            for folder in {os.path.dirname(source) for source in ext.sources}:
                os.makedirs(os.path.join(self.build_temp, folder), exist_ok=True)
            super().build_extension(ext)

    return IncrementalBuildExt


ext_modules, cmdclass = _extensions()
setup(ext_modules=ext_modules, cmdclass=cmdclass)

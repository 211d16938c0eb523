"""The 16-bit similarity tile of the CUDA kernels, emulated on the CPU (tests/cpp/tile_emulation.cpp).

The emulator moves data with the kernel's own layout arithmetic (kernels/tile_layout.h: copies, swizzle,
ldmatrix addresses, accumulator positions) through cp.async, ldmatrix and mma.sync as the PTX ISA defines
them; the product it leaves must be float64 math's on the same 16-bit inputs. It also audits the layout
(every entry visited once, the promised conflict-free accesses). Compiled here with the C++ compiler that
builds fastclip's extension.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "tests" / "cpp" / "tile_emulation.cpp"


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    assert compiler, "no C++ compiler on PATH (fastclip's extension needs one too)"
    binary = tmp_path_factory.mktemp("tile") / "tile_emulation"
    subprocess.run(
        [compiler, "-std=c++17", "-O2", f"-I{ROOT / 'kernels'}", str(SOURCE), "-o", str(binary)],
        check=True,
        capture_output=True,
    )
    return binary


def emulate(binary: Path, image: torch.Tensor, text: torch.Tensor, vectorized: bool, tmp_path: Path) -> torch.Tensor:
    inputs, output = tmp_path / "in.bin", tmp_path / "out.bin"
    np.concatenate([image.float().numpy().ravel(), text.float().numpy().ravel()]).astype(np.float32).tofile(inputs)
    rows, dim = image.shape
    cols = text.shape[0]
    args = [str(binary), str(rows), str(cols), str(dim), str(int(vectorized)), str(inputs), str(output)]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return torch.from_numpy(np.fromfile(output, dtype=np.float32).reshape(rows, cols))


# (rows, cols, dim, vectorized): one entry, tile edges (127/128/129, 257), dims that end mid-stage and
# mid-chunk (element-by-element copies), enough stages to go round the 4-slot ring more than once.
SHAPES = [
    (1, 1, 8, True),
    (1, 1, 1, False),
    (128, 128, 32, True),
    (129, 257, 40, True),
    (127, 130, 520, True),
    (200, 77, 13, False),
    (3, 300, 71, False),
    (64, 129, 264, True),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, cols, dim, vectorized", SHAPES)
def test_tile_matches_float64(emulator, tmp_path, rows, cols, dim, vectorized, dtype) -> None:
    image = torch.randn(rows, dim).to(dtype)
    text = torch.randn(cols, dim).to(dtype)
    dots = emulate(emulator, image, text, vectorized, tmp_path).double()
    reference = image.double() @ text.double().T
    # fp32 accumulation of exact 16-bit products: a few roundings of the sum of |products|.
    bound = 1e-6 * (image.double().abs() @ text.double().abs().T) * max(1.0, dim / 64)
    assert torch.all((dots - reference).abs() <= bound), (dots - reference).abs().max()


def test_vectorized_copies_need_whole_chunks(emulator, tmp_path) -> None:
    """The kernel takes the 16-byte path only for dims that are whole chunks; the emulator refuses others."""
    inputs = tmp_path / "in.bin"
    np.zeros(2 * 12, dtype=np.float32).tofile(inputs)
    args = [str(emulator), "2", "2", "12", "1", str(inputs), str(tmp_path / "out")]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 1 and "whole 16-byte chunks" in result.stderr

"""Peak memory of the loss's forward + backward on a CPU, measured by the kernel's own high-water mark.

Each measurement runs in a fresh Python process: it creates the inputs, resets the resident-set
high-water mark (writing "5" to /proc/self/clear_refs), runs forward + backward, and reports
VmHWM - VmRSS before the call, i.e. the extra bytes the call needed at its peak.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from fastclip import _extension

MEASURE = textwrap.dedent(
    """
    import json, sys, torch
    import torch.nn.functional as F
    import fastclip
    from fastclip.ops.reference import contrastive_loss_reference

    def status(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))

    n, dim, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    torch.manual_seed(0)
    image = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    text = F.normalize(torch.randn(n, dim), dim=-1).requires_grad_()
    scale = torch.tensor(14.3, requires_grad=True)
    # Gradient buffers are part of the inputs' footprint, not of the loss: allocate them up front.
    for leaf in (image, text, scale):
        leaf.grad = torch.zeros_like(leaf)
    if path == "reference":
        loss_fn = lambda i, t: contrastive_loss_reference(i, t, scale)
    else:
        loss_fn = lambda i, t: fastclip.contrastive_loss(i, t, scale, backend=path)
    loss_fn(image[:256], text[:256]).backward()  # warm-up on a small batch: thread pools, lazy init
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status("VmRSS")
    loss_fn(image, text).backward()
    print(json.dumps({"peak_extra": status("VmHWM") - before}))
    """
)


def peak_extra_bytes(path: str, n: int, dim: int) -> int:
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    result = subprocess.run(
        [sys.executable, "-c", MEASURE, str(n), str(dim), path], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])["peak_extra"]


N, DIM = 16384, 256
needs_extension = pytest.mark.skipif(not _extension.is_loaded(), reason="fastclip._C not built")
requires_proc = pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")


@pytest.fixture(scope="module")
def reference_peak() -> int:
    return peak_extra_bytes("reference", N, DIM)


@requires_proc
@pytest.mark.parametrize("backend", ["torch", pytest.param("cpp", marks=needs_extension)])
def test_peak_memory_is_a_small_fraction_of_the_reference(backend: str, reference_peak: int) -> None:
    reference = reference_peak
    fused = peak_extra_bytes(backend, N, DIM)
    print(f"peak extra bytes at N={N}, D={DIM} fp32: reference {reference}, {backend} {fused}")
    assert reference >= N * N * 4, f"the reference should hold at least the N x N logits, measured {reference}"
    mib = 2**20
    assert fused < 0.10 * reference, (
        f"{backend}: peak extra {fused / mib:.1f} MiB vs reference {reference / mib:.1f} MiB"
    )

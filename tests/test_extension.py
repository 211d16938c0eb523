"""The optional extension: `fastclip info` reports it, and fastclip works without it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import torch

import fastclip
from fastclip import _extension


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)


def test_info_reports_versions_and_backends() -> None:
    report = fastclip.info()
    assert report["fastclip"] == fastclip.__version__
    assert report["torch"] == torch.__version__
    for op in ("contrastive_lse", "pairwise_sigmoid"):
        states = report[op]
        assert states["torch"] == "usable"
        assert states["cpp"] == ("usable" if _extension.has_kernel(op, "CPU") else "not built")
        if not torch.cuda.is_available():
            assert states["cuda"] in ("not built", "built, no GPU")


def test_info_command_line() -> None:
    def command(*args: str) -> str:
        return subprocess.run(
            [sys.executable, "-m", "fastclip", *args], capture_output=True, text=True, check=True
        ).stdout

    text = command("info")
    assert "contrastive_lse:" in text and f"torch              {torch.__version__}" in text
    assert json.loads(command("info", "--json"))["fastclip"] == fastclip.__version__


def test_works_without_the_extension() -> None:
    """With `_C` unimportable: one warning, the PyTorch path computes the loss, cpp is refused clearly."""
    result = run_python(
        """
        import sys, warnings
        sys.modules["fastclip._C"] = None  # makes `from fastclip import _C` raise ImportError
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import torch, fastclip
            from fastclip.ops.reference import contrastive_loss_reference
            image, text = torch.randn(9, 5), torch.randn(9, 5)
            loss = fastclip.contrastive_loss(image, text, 3.0)
        assert abs(loss.item() - contrastive_loss_reference(image, text, 3.0).item()) < 1e-5
        from fastclip.ops.reference import sigmoid_loss_reference, supcon_loss_reference
        siglip = fastclip.sigmoid_loss(image, text, 3.0, -1.0)
        assert abs(siglip.item() - sigmoid_loss_reference(image, text, 3.0, -1.0).item()) < 1e-5
        supcon = fastclip.supcon_loss(image[:8], temperature=0.5)
        assert abs(supcon.item() - supcon_loss_reference(image[:8], None, 0.5).item()) < 1e-5
        assert sum("fastclip._C could not be loaded" in str(w.message) for w in caught) == 1, caught
        assert fastclip.info()["contrastive_lse"]["cpp"] == "not built"
        try:
            fastclip.contrastive_loss(image, text, 3.0, backend="cpp")
        except RuntimeError as error:
            assert "backend='cpp' cannot run here" in str(error)
        else:
            raise AssertionError("backend='cpp' without the extension must raise")
        print("ok")
        """
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr


def test_extension_errors_switch_raises_the_import_error() -> None:
    result = run_python(
        """
        import os, sys
        os.environ["FASTCLIP_EXTENSION_ERRORS"] = "1"
        sys.modules["fastclip._C"] = None
        import torch, fastclip
        fastclip.contrastive_loss(torch.randn(3, 2), torch.randn(3, 2), 1.0)
        """
    )
    assert result.returncode != 0 and "import of fastclip._C halted" in result.stderr, result.stderr

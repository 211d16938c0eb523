"""fastclip without its optional pieces, as on a GPU image that lacks ftfy and the reference tokenizers.

Each check runs in a fresh interpreter where a meta-path finder makes the hidden packages unimportable,
exactly as if they were not installed.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

HIDE = """
import importlib.abc, sys
HIDDEN = {hidden!r}

class Hide(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in HIDDEN:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

for name in list(sys.modules):  # nothing imported yet, but be sure
    if name.partition(".")[0] in HIDDEN:
        del sys.modules[name]
sys.meta_path.insert(0, Hide())
"""


def run_without(hidden: set[str], code: str) -> subprocess.CompletedProcess:
    script = HIDE.format(hidden=sorted(hidden)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)


def test_fastclip_works_without_ftfy_and_reference_tokenizers() -> None:
    result = run_without(
        {"ftfy", "wcwidth", "open_clip", "clip"},
        """
        import torch
        import fastclip
        from fastclip import tokenizer

        # the loss on every CPU backend, against its float64 reference
        from fastclip.ops.reference import contrastive_loss_reference
        image = torch.nn.functional.normalize(torch.randn(37, 24), dim=-1)
        text = torch.nn.functional.normalize(torch.randn(37, 24), dim=-1)
        want = contrastive_loss_reference(image.double(), text.double(), 20.0)
        for backend in ("torch", "cpp"):
            got = fastclip.contrastive_loss(image, text, 20.0, backend=backend)
            assert abs(got.item() - want.item()) < 1e-4, (backend, got, want)

        # a model, fed by the tokenizer from the packaged vocab file; ASCII captions need no ftfy
        assert tokenizer.find_vocab_file() == tokenizer.PACKAGED_VOCAB
        model = fastclip.create_model("tiny-ViT").eval()
        tokens = fastclip.tokenize(["a photo of a cat.", "a red circle"])
        assert tokens[0, :8].tolist() == [49406, 320, 1125, 539, 320, 2368, 269, 49407]
        with torch.no_grad():
            features = model.encode_text(tokens)
        assert features.shape[0] == 2 and torch.isfinite(features).all()

        # text that needs ftfy's cleaning says which package is missing
        try:
            fastclip.tokenize(["caf\\u00e9"])
        except ModuleNotFoundError as error:
            assert "ftfy" in str(error) and "pip install ftfy" in str(error), error
        else:
            raise AssertionError("non-ASCII text tokenized without ftfy")

        # every benchmark script imports
        import importlib
        sys.path.insert(0, "benchmarks")
        for name in ("bench_loss", "bench_attention", "bench_train", "bench_model", "bench_tokenizer"):
            importlib.import_module(name)
        print("ok")
    """,
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_info_command_without_ftfy() -> None:
    result = run_without(
        {"ftfy", "wcwidth"},
        """
        import runpy
        sys.argv = ["fastclip", "info"]
        runpy.run_module("fastclip", run_name="__main__")
    """,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "contrastive_lse:" in result.stdout and "attention:" in result.stdout

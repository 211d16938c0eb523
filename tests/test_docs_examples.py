"""Every Python block of the README and of docs/*.md runs as pasted.

Each block runs alone, in a fresh interpreter, in a working folder that the document's earlier blocks
share (so a walk-through whose first block writes files is followed as a reader would). Files that a
document gets from a shell command (a training run that takes minutes) are made here by `PREPARED`.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.DOTALL | re.MULTILINE)


def _tiny_model(folder: Path) -> None:
    """docs/evaluate.md's `model.safetensors` comes from a 2-minute training run; any model will do here."""
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import fastclip; fastclip.save_checkpoint(fastclip.create_model('tiny-ViT'), 'model.safetensors')",
        ],
        cwd=folder,
        check=True,
        timeout=300,
    )


# document name -> (index of the block that needs it, what the reader's shell command would have made)
PREPARED: dict[str, tuple[int, Callable[[Path], None]]] = {"evaluate.md": (1, _tiny_model)}


def blocks(document: Path) -> list[str]:
    return BLOCK.findall(document.read_text())


def test_documents_have_python_blocks() -> None:
    assert len(blocks(ROOT / "README.md")) >= 5  # the collector finds them (a broken regex would pass vacuously)


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: p.name)
def test_python_blocks_run_as_pasted(document: Path, tmp_path: Path) -> None:
    prepared = PREPARED.get(document.name)
    for index, code in enumerate(blocks(document)):
        if prepared and prepared[0] == index:
            prepared[1](tmp_path)
        result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{document.name}, Python block {index + 1}:\n{code}\n{result.stderr[-3000:]}"

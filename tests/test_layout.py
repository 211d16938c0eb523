"""The package's layering, read from the source: which module may import which, and that no module is hidden
by a name its package exports."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import types
from pathlib import Path

import pytest

import fastclip

ROOT = Path(fastclip.__file__).parent


def imported_modules(path: Path) -> set[str]:
    """Every module `path` imports, at any depth (function-level imports included), as absolute names."""
    package = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this file's package
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from package import module`
    return names


def all_modules() -> list[str]:
    return sorted(
        info.name
        for info in pkgutil.walk_packages([str(ROOT)], prefix="fastclip.")
        if info.name not in ("fastclip._C", "fastclip.__main__")
    )  # __main__ runs the CLI


def test_checkpoint_knows_configs_not_models() -> None:
    """fastclip.checkpoint is the lower layer: it reads and writes state dicts and configs; building a model
    from them is the factory's job, so nothing in it imports the model package beyond its configs."""
    for path in sorted((ROOT / "checkpoint").glob("*.py")):
        model_imports = {name for name in imported_modules(path) if name.startswith("fastclip.model")}
        beyond_configs = {name for name in model_imports if name.split(".")[:3] != ["fastclip", "model", "config"]}
        assert not beyond_configs, f"{path.name} imports {sorted(beyond_configs)}"


def test_commands_do_not_import_each_other() -> None:
    """Each sub-command module stands alone; what two commands share lives outside the command modules."""
    commands = {path.stem for path in (ROOT / "commands").glob("*.py") if not path.stem.startswith("_")}
    for name in sorted(commands):
        others = {f"fastclip.commands.{other}" for other in commands - {name}}
        imported = imported_modules(ROOT / "commands" / f"{name}.py")
        assert not any(module == other or module.startswith(other + ".") for module in imported for other in others), (
            f"commands/{name}.py imports {sorted(m for m in imported if m.startswith('fastclip.commands.'))}"
        )


@pytest.mark.parametrize("name", all_modules())
def test_no_module_is_hidden_by_an_export(name: str) -> None:
    """`import fastclip.ops.attention as m` gives the module: no package rebinds a submodule's name."""
    if name == "fastclip.ops.attention_triton":
        pytest.importorskip("triton")
    module = importlib.import_module(name)
    parent, _, child = name.rpartition(".")
    bound = getattr(importlib.import_module(parent), child)
    assert isinstance(bound, types.ModuleType) and bound is module, f"{parent}.{child} is {bound!r}, not the module"

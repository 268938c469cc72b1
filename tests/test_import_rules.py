"""The rooms' boundaries, read from the source (every import, lazy ones included).

``training/shared`` is what serving needs from the training side, so "serving imports no
fastai" is a folder rule: nothing there imports fastai or another ``training`` folder, and
the backend's service imports from ``training`` only ``shared`` and ``labelstudio``.
``training/`` never imports ``backend/``; the service and the loop never import the
operator's tools.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"fastai", "fastcore"}


def _imports(path: Path) -> list[str]:
    """Every module ``path`` imports, absolute, wherever the import statement sits."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append(node.module)
            found += [f"{node.module}.{alias.name}" for alias in node.names]
    return found


def _modules(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


def _allowed(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _violations(folder: str, inside: str, allowed: tuple[str, ...]) -> list[str]:
    """Imports from modules in ``folder`` into package ``inside`` that are not ``allowed``."""
    bad = []
    for path in _modules(folder):
        for module in _imports(path):
            top = module.split(".")[0]
            if top in HEAVY or (top == inside and not _allowed(module, allowed)):
                if top == inside and "." not in module:
                    continue  # `from training import __version__` style names the package only
                bad.append(f"{path.relative_to(ROOT)} imports {module}")
    return bad


@pytest.mark.parametrize(
    ("folder", "inside", "allowed"),
    [
        ("training/shared", "training", ("training.shared",)),
        ("training/labelstudio", "training", ("training.shared", "training.labelstudio")),
        ("backend/service", "training", ("training.shared", "training.labelstudio")),
    ],
)
def test_the_serving_side_imports_no_fastai_and_no_training_folder_but_its_own(
    folder: str, inside: str, allowed: tuple[str, ...]
) -> None:
    assert _violations(folder, inside, allowed) == []


@pytest.mark.parametrize("folder", ["training"])
def test_training_never_imports_the_backend(folder: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _modules(folder)
        for module in _imports(path)
        if module.split(".")[0] == "backend"
    ]
    assert bad == []


@pytest.mark.parametrize("folder", ["backend/service", "backend/loop"])
def test_the_service_and_the_loop_never_import_the_operator_tools(folder: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {module}"
        for path in _modules(folder)
        for module in _imports(path)
        if _allowed(module, ("backend.tools",))
    ]
    assert bad == []


def test_the_rules_see_a_violation(tmp_path: Path) -> None:
    """The reader finds lazy imports and ``from x import y`` forms (else rules prove nothing)."""
    source = tmp_path / "m.py"
    source.write_text(
        "def f():\n    from training.fitting import recipe\n    import fastai.learner\n",
        encoding="utf-8",
    )
    found = _imports(source)
    assert "training.fitting.recipe" in found and "fastai.learner" in found

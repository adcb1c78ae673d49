"""The ML core's stable surface: the names of `restoration` and of its subpackages' `__init__`. Code outside the
package (service, app, worker, cli, the benches, the examples in README and docs) imports only from it, never from the
modules inside a subpackage."""
from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

import restoration

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("models", "faces", "diffusion", "adaptation", "training", "metrics", "degrade", "data")
OUTSIDE = ("service", "app", "worker", "cli", "bench", "alembic")


def _imported_modules(source: str) -> list[tuple[int, str]]:
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.append((node.lineno, node.module))
            out += [(node.lineno, f"{node.module}.{a.name}") for a in node.names
                    if importlib.util.find_spec(node.module) and _is_module(f"{node.module}.{a.name}")]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
    return out


def _is_module(name: str) -> bool:
    """`from parent import child` takes a module (not a name the package exports under the same word)."""
    parent, _, child = name.rpartition(".")
    try:
        package = importlib.import_module(parent)
    except ModuleNotFoundError:
        return False
    return hasattr(package, "__path__") and child not in getattr(package, "__all__", ()) and \
        importlib.util.find_spec(name) is not None


def _internal(module: str) -> bool:
    parts = module.split(".")
    return parts[0] == "restoration" and len(parts) > 2 and parts[1] in SUBPACKAGES


def test_every_public_name_resolves():
    for name in restoration.__all__:
        assert hasattr(restoration, name), name
    for sub in SUBPACKAGES:
        mod = importlib.import_module(f"restoration.{sub}")
        assert mod.__all__, sub
        for name in mod.__all__:
            assert hasattr(mod, name), f"restoration.{sub}.{name}"


def test_the_package_top_serves_the_readme_example():
    from restoration import Restorer, Zoo, adapt, build, encode_image, load_image  # noqa: F401

    assert adapt is restoration.adaptation.run_adaptation


@pytest.mark.parametrize("room", OUTSIDE)
def test_code_outside_the_package_uses_the_public_surface(room):
    bad = []
    for path in sorted((REPO / room).rglob("*.py")):
        for line, module in _imported_modules(path.read_text()):
            if _internal(module):
                bad.append(f"{path.relative_to(REPO)}:{line} imports {module}")
    assert not bad, "import these from `restoration` or `restoration.<subpackage>` instead:\n" + "\n".join(bad)


def test_docs_examples_use_the_public_surface():
    bad = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S):
            for line, module in _imported_modules(block):
                if _internal(module):
                    bad.append(f"{path.relative_to(REPO)}: {module}")
    assert not bad, "\n".join(bad)

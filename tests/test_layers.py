"""The package's layers, read from its imports (docs/architecture.md, "Which may import which").

``_bus`` (and its subscriber bookkeeping) wires features; a feature (local, live,
durable; next delayed, queues) uses primitives; a primitive uses primitives.
A primitive never imports a feature or the bus, a feature never imports another
feature or the bus, and nothing at run time imports ``eventbus.testing``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path
from typing import Final

import pytest

import eventbus

PACKAGE: Final = Path(eventbus.__file__).parent

FACADE: Final = frozenset({"eventbus._bus", "eventbus._subscribers"})
FEATURES: Final = (
    "eventbus._local",
    "eventbus._live",
    "eventbus._streams",
    "eventbus._delayed",
    "eventbus._queues",
)
"""Each a module or a package: everything under it is that feature."""
TOP: Final = frozenset(
    {"eventbus", "eventbus.__main__", "eventbus._runner", "eventbus.sync", "eventbus.otel"}
)
CLI: Final = "eventbus._cli"
"""The command line (a package): on top, like ``__main__``, a user of the rest."""


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """Every ``eventbus`` module ``path`` imports (relative imports resolved;
    ``from . import x`` counts as importing ``x`` when it is a module)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / Path(*candidate.split("."))).with_suffix(".py").exists():
                    found.add(candidate)  # "from . import signals" imports a module
                else:
                    found.add(target)
    return {m for m in found if m == "eventbus" or m.startswith("eventbus.")}


def feature_of(module: str) -> str | None:
    for feature in FEATURES:
        if module == feature or module.startswith(feature + "."):
            return feature
    return None


def layer(module: str) -> str:
    if module in TOP or module == CLI or module.startswith(CLI + "."):
        return "top"
    if module == "eventbus.testing" or module.startswith("eventbus.testing."):
        return "testing"
    if module in FACADE:
        return "facade"
    if feature_of(module) is not None:
        return "feature"
    return "primitive"


def violations(edges: dict[str, set[str]]) -> list[str]:
    """What breaks the rules in ``edges`` (module -> modules it imports)."""
    found = []
    for module, targets in sorted(edges.items()):
        kind = layer(module)
        for target in sorted(targets):
            target_kind = layer(target)
            if target_kind == "testing" and kind != "testing":
                found.append(f"{module} imports {target}: the runtime never imports testing")
            elif kind == "primitive" and target_kind in ("feature", "facade", "top"):
                found.append(f"primitive {module} imports {target_kind} {target}")
            elif kind == "feature" and target_kind in ("facade", "top"):
                found.append(f"feature {module} imports {target_kind} {target}")
            elif (
                kind == "feature"
                and target_kind == "feature"
                and feature_of(target) != feature_of(module)
            ):
                found.append(f"feature {module} imports another feature: {target}")
    return found


def package_edges() -> dict[str, set[str]]:
    return {module_name(path): imports(path) for path in sorted(PACKAGE.rglob("*.py"))}


def test_the_layers_hold() -> None:
    edges = package_edges()
    # The reading sees what it should: the bus wires every feature.
    assert {"eventbus._local", "eventbus._live._feature", "eventbus._streams._feature"} <= edges[
        "eventbus._bus"
    ]
    assert violations(edges) == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [
        ({"eventbus._hub": {"eventbus._live._push"}}, "primitive eventbus._hub imports feature"),
        ({"eventbus._codec": {"eventbus._bus"}}, "primitive eventbus._codec imports facade"),
        (
            {"eventbus._streams._group": {"eventbus._live._publisher"}},
            "imports another feature",
        ),
        ({"eventbus._local": {"eventbus._bus"}}, "feature eventbus._local imports facade"),
        ({"eventbus._bus": {"eventbus.testing._proxy"}}, "never imports testing"),
        ({"eventbus._streams._group": {"eventbus._cli"}}, "imports top eventbus._cli"),
        ({"eventbus._cli._session": {"eventbus.testing"}}, "never imports testing"),
    ],
)
def test_the_rules_catch(edges: dict[str, set[str]], expected: str) -> None:
    (found,) = violations(edges)
    assert expected in found


def test_relative_imports_are_resolved() -> None:
    edges = package_edges()
    assert "eventbus._hub" in edges["eventbus._live._push"]  # from .._hub import ...
    assert "eventbus._streams._group" in edges["eventbus._streams._feature"]  # from ._group
    assert (
        "eventbus.signals" in edges["eventbus._local"]
        or "eventbus.signals" in edges["eventbus._feature"]
    )  # from . import signals


def test_runtime_never_imports_testing() -> None:
    code = "import eventbus, sys; print('eventbus.testing' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

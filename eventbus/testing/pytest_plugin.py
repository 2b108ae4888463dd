"""pytest fixtures for eventbus: real redis-server processes, never a mock.

Enable with ``-p eventbus.testing.pytest_plugin`` (or ``pytest_plugins = [...]``).

* ``redis_server`` (session): one private server for the session; or the server
  at ``--redis-url`` if given.
* ``redis_server_factory`` (function): private servers for destructive tests,
  stopped at teardown.
* ``bus_factory`` (function): builds ``EventBus`` objects with a unique key
  prefix per test, so tests never see each other's channels.
* ``anyio_backend``: ``"asyncio"`` (redis-py is asyncio-only).

The pytest header names the redis-server binary and version in use.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from .._bus import EventBus
from .._server import RedisServer, find_redis_server

__all__ = [
    "anyio_backend",
    "bus_factory",
    "redis_server",
    "redis_server_factory",
    "redis_url",
    "server_version",
]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-url",
        default=None,
        help="use this Redis, not a private redis-server (fault tests still start their own)",
    )


def pytest_report_header(config: pytest.Config) -> list[str]:
    if config.getoption("--redis-url"):
        return [f"eventbus: external Redis at {config.getoption('--redis-url')}"]
    try:
        binary = find_redis_server()
    except Exception as exc:
        return [f"eventbus: no redis-server found ({exc})"]
    tls = "with TLS" if binary.tls else "no TLS"
    return [
        f"eventbus: redis-server {binary.version_str} ({tls}) from {binary.source}: {binary.path}"
    ]


@pytest.fixture(scope="module")
def anyio_backend() -> str:
    """``"asyncio"``: redis-py is asyncio-only."""
    return "asyncio"


def pytest_configure(config: pytest.Config) -> None:
    # The same fixture again, registered now: after anyio's own plugin, which pytest
    # loads from its entry point after ``-p`` plugins, and whose ``anyio_backend``
    # (every backend installed: trio too, once anything installs trio) would
    # otherwise shadow the one above. Of two plugins' fixtures, the last registered wins.
    from . import _asyncio_only

    if not config.pluginmanager.is_registered(_asyncio_only):
        config.pluginmanager.register(_asyncio_only, "eventbus-asyncio-only")


@pytest.fixture(scope="session")
def redis_server(request: pytest.FixtureRequest) -> Iterator[RedisServer | None]:
    """The session's shared server (``None`` when ``--redis-url`` is given)."""
    if request.config.getoption("--redis-url"):
        yield None
        return
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def redis_url(request: pytest.FixtureRequest, redis_server: RedisServer | None) -> str:
    url = request.config.getoption("--redis-url")
    if url:
        return str(url)
    assert redis_server is not None
    return redis_server.url


@pytest.fixture(scope="session")
def server_version(redis_server: RedisServer | None) -> tuple[int, ...]:
    if redis_server is None:
        return (99,)
    return redis_server.binary.version


@pytest.fixture
def redis_server_factory() -> Iterator[Callable[..., RedisServer]]:
    """Start private servers (``factory(**RedisServer kwargs)``); all stopped at teardown."""
    servers: list[RedisServer] = []

    def factory(**kwargs: Any) -> RedisServer:
        server = RedisServer(**kwargs).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.close()


@pytest.fixture
def bus_factory(redis_url: str) -> Callable[..., EventBus]:
    """``bus_factory(url=None, **kwargs)``: an EventBus with this test's unique prefix."""
    prefix = f"t{uuid.uuid4().hex[:8]}"

    def factory(url: str | None = None, **kwargs: Any) -> EventBus:
        kwargs.setdefault("prefix", prefix)
        return EventBus(url or redis_url, **kwargs)

    return factory

"""Helpers for tests/test_security.py: an admin client, ACL LOG counts, test certificates."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import traceback
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import anyio
import attrs
import redis.asyncio as aioredis
import trustme
from redis.credentials import CredentialProvider

from eventbus.testing import RedisServer


@contextlib.asynccontextmanager
async def admin_client(server: RedisServer, **tls: Any) -> AsyncIterator[aioredis.Redis]:
    """A redis-py client as the ``default`` user, to inspect the server (never the bus's)."""
    client = aioredis.Redis.from_url(server.url, decode_responses=True, **tls)
    try:
        yield client
    finally:
        await client.aclose()


async def acl_log_count(
    admin: aioredis.Redis, *, user: str, reason: str | None = None, obj: str | None = None
) -> int:
    """Denials in ``ACL LOG`` for ``user`` (Redis folds repeats into one entry's ``count``)."""
    entries = await admin.acl_log(count=1000)
    return sum(
        int(entry["count"])
        for entry in entries
        if entry["username"] == user
        and (reason is None or entry["reason"] == reason)
        and (obj is None or entry["object"] == obj)
    )


async def connections_of(admin: aioredis.Redis, user: str) -> list[dict[str, Any]]:
    """``CLIENT LIST`` entries authenticated as ``user``."""
    return [c for c in await admin.client_list() if c.get("user") == user]


async def wait_until(
    predicate: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.01
) -> float:
    """Poll a server-side condition until it holds; fail after ``timeout``. Returns seconds."""
    start = anyio.current_time()
    with anyio.fail_after(timeout):
        while not await predicate():  # noqa: ASYNC110 - polls server state: no event to wait on
            await anyio.sleep(interval)
    return anyio.current_time() - start


async def wait_for_no_new_tasks(before: set[asyncio.Task[Any]], *, timeout: float) -> None:
    """Fail unless every task started since ``before`` was taken ends within ``timeout``."""

    async def settled() -> bool:
        return not (asyncio.all_tasks() - before)

    await wait_until(settled, timeout=timeout)


def exception_texts(exc: BaseException) -> str:
    """Everything an exception would show: the formatted chain plus each link's repr/args."""
    parts = ["".join(traceback.format_exception(exc))]
    seen: set[int] = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:
        seen.add(id(link))
        parts += [str(link), repr(link), repr(link.args)]
        link = link.__cause__ or link.__context__
    return "\n".join(parts)


def cause_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and every exception it was raised from (``__cause__`` or ``__context__``)."""
    chain: list[BaseException] = []
    link: BaseException | None = exc
    while link is not None and link not in chain:
        chain.append(link)
        link = link.__cause__ or link.__context__
    return chain


def log_texts(records: Iterable[logging.LogRecord]) -> str:
    """Every rendered message, argument and traceback of ``records``."""
    handler = logging.Handler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    out = []
    for record in records:
        out += [handler.format(record), repr(record.args), record.exc_text or ""]
    return "\n".join(out)


class RotatingCredentials(CredentialProvider):
    """A redis-py credential provider that returns whatever secret is current."""

    def __init__(self, username: str, password: str) -> None:
        self.username = username
        self.password = password
        self.calls = 0

    def get_credentials(self) -> tuple[str, str]:
        self.calls += 1
        return (self.username, self.password)

    async def get_credentials_async(self) -> tuple[str, str]:
        return self.get_credentials()


@attrs.frozen
class TLSFiles:
    """PEM files of a test PKI made with trustme (paths as str, as redis-py wants)."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca: str
    """A CA that signed nothing the server uses: the "wrong CA" of S3."""
    mismatch_cert: str
    """A server certificate from the right CA for a name that is not 127.0.0.1."""
    mismatch_key: str


def make_tls_files(directory: Path) -> TLSFiles:
    """A CA, a server certificate for IP 127.0.0.1, a client certificate, a foreign CA."""
    ca = trustme.CA()
    other = trustme.CA()
    server = ca.issue_cert("127.0.0.1")
    client = ca.issue_cert("eventbus-client@example.org")
    mismatch = ca.issue_cert("redis.example.org")

    def write(name: str, blob: Any) -> str:
        path = directory / name
        blob.write_to_path(str(path))
        return str(path)

    return TLSFiles(
        ca=write("ca.pem", ca.cert_pem),
        server_cert=write("server.pem", server.cert_chain_pems[0]),
        server_key=write("server.key", server.private_key_pem),
        client_cert=write("client.pem", client.cert_chain_pems[0]),
        client_key=write("client.key", client.private_key_pem),
        other_ca=write("other-ca.pem", other.cert_pem),
        mismatch_cert=write("mismatch.pem", mismatch.cert_chain_pems[0]),
        mismatch_key=write("mismatch.key", mismatch.private_key_pem),
    )

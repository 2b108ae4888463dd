"""Redis clients from a URL, and the one boundary where redis-py errors become ours."""

from __future__ import annotations

import contextlib
import inspect
import logging
import re
import ssl
from collections.abc import Iterator
from typing import Any, Final, Literal
from urllib.parse import urlsplit, urlunsplit

import anyio
import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.typing import EncodableT

from .errors import (
    AuthenticationFailed,
    BackendError,
    BackendOOM,
    ConfigurationError,
    PermissionDenied,
    RedisUnavailable,
    TLSError,
)

__all__ = [
    "CONNECTION_ERRORS",
    "ClientFactory",
    "is_busygroup",
    "is_nogroup",
    "is_unblocked",
    "map_exceptions",
    "mask_url",
    "translate",
]

logger = logging.getLogger("eventbus")

# Commands retried by the command client: redis-py's retry covers every
# ConnectionError, including AuthenticationError (a subclass), which must fail at once.
# A timeout is not retried either: the server is there but silent (stopped, paused,
# busy in a script), and another attempt would only multiply the wait (F6).
_NOT_RETRYABLE: Final = (rex.AuthenticationError, rex.AuthorizationError, rex.TimeoutError)

CONNECTION_ERRORS: Final = (rex.ConnectionError, rex.TimeoutError, OSError)
"""What a lost or unreachable connection raises: loops that reconnect catch these
(redis-py's ``TimeoutError`` is not a ``ConnectionError``, and sockets raise ``OSError``)."""


def is_nogroup(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's ``NOGROUP``: the consumer group (or its stream) is gone
    (FLUSHALL, DEL, a failover to a replica that never had it)."""
    return isinstance(exc, rex.ResponseError) and "NOGROUP" in str(exc)


def is_busygroup(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's ``BUSYGROUP``: ``XGROUP CREATE`` found the group there."""
    return isinstance(exc, rex.ResponseError) and "BUSYGROUP" in str(exc)


def is_unblocked(exc: BaseException) -> bool:
    """Whether ``exc`` is Redis's ``UNBLOCKED`` (Redis >= 7): the stream was deleted
    (DEL, FLUSHALL) under a blocked ``XREADGROUP``, which then ends without ``NOGROUP``."""
    return isinstance(exc, rex.ResponseError) and "UNBLOCKED" in str(exc)


def _quiet_connect_options() -> dict[str, Any]:
    """Options that stop redis-py sending optional commands on every connect.

    redis-py 8 sends ``CLIENT SETINFO`` (twice) and ``CLIENT MAINT_NOTIFICATIONS`` on
    connect. Each is a round trip, and under a least-privilege ACL each is a
    refusal in ``ACL LOG`` (Redis 6.2 checks them; 7.0 rejects them as unknown).
    The bus needs neither.
    """
    params = inspect.signature(AbstractConnection.__init__).parameters
    options: dict[str, Any] = {}
    if "driver_info" in params:
        options["driver_info"] = None  # explicit None: no CLIENT SETINFO
    elif "lib_name" in params:  # redis-py < 8
        options["lib_name"] = None
        options["lib_version"] = None
    if "maint_notifications_config" in params:
        from redis.maint_notifications import MaintNotificationsConfig

        options["maint_notifications_config"] = MaintNotificationsConfig(enabled=False)
    return options


def mask_url(url: str) -> str:
    """``url`` with any password replaced by ``***`` (safe to log or repr)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable url>"
    if parts.password is None and "@" not in parts.netloc:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{user}:***@{host}" if parts.password is not None else f"{user}@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def _caused_by_certificate(error: BaseException) -> bool:
    """A failed certificate check: retrying the handshake cannot change the answer."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, ssl.SSLCertVerificationError):
            return True
        cause = cause.__cause__ or cause.__context__
    return False


class _Retry(Retry):
    """redis-py's Retry, minus authentication errors (never retried, see RELIABILITY R9)."""

    async def call_with_retry(
        self, do: Any, fail: Any, is_retryable: Any = None, with_failure_count: bool = False
    ) -> Any:
        def retryable(error: Exception) -> bool:
            if isinstance(error, _NOT_RETRYABLE) or _caused_by_certificate(error):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return await super().call_with_retry(
            do, fail, is_retryable=retryable, with_failure_count=with_failure_count
        )


# "this user has no permissions to run the 'client|id' command"
_REFUSED_COMMAND: Final = re.compile(r"run the '([^']+)' command")


def _refused_command(detail: str) -> str | None:
    match = _REFUSED_COMMAND.search(detail)
    return match.group(1) if match else None


def _acl_hint(detail: str, command: str, channel: str | None) -> str | None:
    """The ACL rule that grants what ``detail`` (a NOPERM message) refused."""
    if "channels" in detail:
        if channel is None:
            return "&<prefix>:*"
        if command.upper() == "PSUBSCRIBE":
            # Redis matches a PSUBSCRIBE pattern against channel rules literally:
            # only a rule equal to the pattern (or allchannels) grants it.
            return f"&{channel}"
        prefix, sep, _ = channel.partition(":")  # a prefix never contains ":"
        return f"&{prefix}:*" if sep else f"&{channel}"
    if "keys" in detail:
        return "~<prefix>:*"
    refused = _refused_command(detail) or command.lower()
    if command.lower().startswith(f"{refused}|"):
        refused = command.lower()  # Redis < 7 names only the command, not the subcommand
    if "run the" in detail and refused:
        return f"+{refused}"
    return None


def _dropped_hint(tls: bool | Literal["established"] | None) -> str:
    """Why a connection is reset or closed right away, given what we know of the scheme.

    Nothing for a connection that had worked (``"established"``): the scheme was right.
    """
    if tls == "established":
        return ""
    if tls is False:
        return " (does the server expect TLS? use rediss://)"
    if tls is True:
        # TLS 1.3: a server that wants a client certificate checks it after the
        # handshake; its alert can be lost to the reset, leaving only this error.
        return " (does the server require a client certificate? pass ssl_certfile and ssl_keyfile)"
    return (
        " (on connect, this is usually a TLS-only port, which needs rediss://, or a server"
        " requiring a client certificate, which needs ssl_certfile and ssl_keyfile)"
    )


def translate(
    exc: BaseException,
    *,
    topic: str | None = None,
    command: str = "",
    channel: str | None = None,
    tls: bool | Literal["established"] | None = None,
    credentials: bool | None = None,
) -> BaseException:
    """The eventbus error for a redis-py (or ssl) error; ``exc`` itself if unknown.

    ``tls``: whether the connection uses TLS, if the caller knows (it picks the hint
    added to a reset or closed connection), or ``"established"`` for a connection
    that had worked (no hint: its scheme and certificates were right). ``credentials``:
    whether any were given (a password or user in the URL, or a credential provider),
    if the caller knows:
    a server that wants them and got none is told apart from one that refused them."""
    if isinstance(exc, rex.NoPermissionError):
        detail = str(exc)
        command = command or (_refused_command(detail) or "command").upper()
        return PermissionDenied(
            command=command,
            topic=topic,
            channel=channel,
            hint=_acl_hint(detail, command, channel),
            detail=detail,
        )
    if isinstance(exc, rex.AuthenticationError | rex.AuthorizationError):
        if credentials is False:
            return AuthenticationFailed(
                "Redis requires authentication and no credentials were given: put them in"
                " the URL (redis://:PASSWORD@host:port/0 for a requirepass server,"
                " redis://USER:PASSWORD@host:port/0 for an ACL user) or pass"
                f" credential_provider= (Redis said: {exc})",
                topic=topic,
            )
        return AuthenticationFailed(f"Redis rejected the credentials: {exc}", topic=topic)
    if isinstance(exc, CONNECTION_ERRORS):
        cause: BaseException | None = exc
        while cause is not None:
            if isinstance(cause, ssl.SSLError):
                return TLSError(f"TLS handshake with Redis failed: {cause}", topic=topic)
            cause = cause.__cause__ or cause.__context__
        text = str(exc)
        if "Connection reset by peer" in text or "Connection closed by server" in text:
            text += _dropped_hint(tls)
        if text.startswith("Redis at "):  # already says where, and what timed out
            return RedisUnavailable(text, topic=topic)
        return RedisUnavailable(f"Redis is unavailable: {text}", topic=topic)
    if isinstance(exc, rex.OutOfMemoryError):
        return BackendOOM(
            f"Redis is out of memory and refused the write (OOM {exc}): used_memory is"
            " over 'maxmemory' and 'maxmemory-policy' is noeviction; free memory (let"
            " consumers catch up, trim streams) or raise 'maxmemory'",
            topic=topic,
        )
    if isinstance(exc, rex.ResponseError):
        return BackendError(f"Redis error: {exc}", topic=topic)
    return exc


@contextlib.contextmanager
def map_exceptions(
    *,
    topic: str | None = None,
    command: str = "",
    channel: str | None = None,
    tls: bool | None = None,
    credentials: bool | None = None,
) -> Iterator[None]:
    """Re-raise redis-py errors as eventbus errors, chained with ``from``."""
    try:
        yield
    except (rex.RedisError, OSError) as exc:
        mapped = translate(
            exc, topic=topic, command=command, channel=channel, tls=tls, credentials=credentials
        )
        if mapped is exc:
            raise
        raise mapped from exc


_hiredis_pack: Any
try:  # hiredis (redis[hiredis]) packs commands in C; redis-py's asyncio connection does not use it
    from hiredis import pack_command as _hiredis_pack
except ImportError:  # pragma: no cover - hiredis is a dependency; an old one lacks pack_command
    _hiredis_pack = None


def _address(conn: AbstractConnection) -> str:
    path = getattr(conn, "path", None)
    if path:
        return str(path)
    return f"{getattr(conn, 'host', '?')}:{getattr(conn, 'port', '?')}"


class _HiredisPacking(AbstractConnection):
    """Packs commands with ``hiredis.pack_command`` (about 6x faster than redis-py's
    pure-Python packer, which its asyncio connections always use; its sync ones
    already use hiredis). Arguments hiredis does not take (bytearray, and the
    bool/None redis-py refuses) go to redis-py's packer, unchanged."""

    def pack_command(self, *args: EncodableT) -> list[bytes]:
        first = args[0]
        if isinstance(first, str) and " " not in first:
            try:
                return [_hiredis_pack(args)]
            except TypeError:
                pass
        return super().pack_command(*args)


class _NamedTimeouts(_HiredisPacking):
    """Also names the address, the timeout and the setting that chose it in a
    timeout's message (redis-py says "Timeout connecting to server" or "Timeout
    reading from host:port"). Only for clients whose timeouts reach the caller
    (the command clients): the wrapper costs a coroutine frame per reply."""

    timeout_setting = "socket_timeout"

    async def connect_check_health(self, *args: Any, **kwargs: Any) -> None:
        try:
            await super().connect_check_health(*args, **kwargs)
        except rex.TimeoutError as exc:
            if "did not answer" in str(exc):  # the handshake's read, already named
                raise
            raise rex.TimeoutError(
                f"Redis at {_address(self)} did not accept the connection within "
                f"{self.socket_connect_timeout:g}s (connect_timeout)"
            ) from exc

    async def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return await super().read_response(*args, **kwargs)
        except rex.TimeoutError as exc:
            timeout = kwargs.get("timeout")
            if timeout is None:
                timeout = self.socket_timeout
            raise rex.TimeoutError(
                f"Redis at {_address(self)} did not answer within {timeout:g}s"
                f" ({self.timeout_setting})"
            ) from exc


_PACKING_CLASSES: dict[tuple[type[AbstractConnection], str | None], type[AbstractConnection]] = {}


def _pack_with_hiredis(client: aioredis.Redis, timeout_setting: str | None) -> aioredis.Redis:
    """Make ``client``'s pool create connections that pack commands with hiredis,
    and (unless ``None``) name ``timeout_setting`` when a reply times out.

    Set on the pool after ``from_url`` chose the class for the URL's scheme
    (plain, TLS or Unix socket), so the subclass keeps that choice."""
    pool = client.connection_pool
    base = pool.connection_class
    packing = _PACKING_CLASSES.get((base, timeout_setting))
    if packing is None:
        if timeout_setting is None:
            packing = type(f"Hiredis{base.__name__}", (_HiredisPacking, base), {})
        else:
            packing = type(
                f"Hiredis{base.__name__}",
                (_NamedTimeouts, base),
                {"timeout_setting": timeout_setting},
            )
        _PACKING_CLASSES[(base, timeout_setting)] = packing
    pool.connection_class = packing
    return client


class ClientFactory:
    """Builds the bus's Redis clients, all with the same URL, TLS and credentials."""

    def __init__(
        self,
        url: str,
        *,
        protocol: int = 3,
        command_timeout: float = 5.0,
        connect_timeout: float = 5.0,
        client_name: str | None = None,
        ssl_ca_certs: str | None = None,
        ssl_certfile: str | None = None,
        ssl_keyfile: str | None = None,
        insecure_skip_verify: bool = False,
        credential_provider: Any = None,
    ) -> None:
        scheme = urlsplit(url).scheme
        if scheme not in ("redis", "rediss", "unix"):
            raise ConfigurationError(f"unsupported URL scheme {scheme!r} in {mask_url(url)}")
        if protocol not in (2, 3):
            raise ConfigurationError(f"protocol must be 2 or 3, got {protocol!r}")
        self.url = url
        self.tls = scheme == "rediss"
        parts = urlsplit(url)
        host = parts.hostname or "localhost"
        if ":" in host:
            host = f"[{host}]"
        self.address = parts.path if scheme == "unix" else f"{host}:{parts.port or 6379}"
        """Where Redis is (``host:port``, or a socket path), for error messages."""
        self.connect_timeout = connect_timeout
        self.command_timeout = command_timeout
        self.credentials = bool(parts.password or parts.username or credential_provider is not None)
        """Whether any credentials were given (in the URL, or a provider)."""
        options: dict[str, Any] = {
            **_quiet_connect_options(),
            "protocol": protocol,
            "socket_connect_timeout": connect_timeout,
            "client_name": client_name,
        }
        if credential_provider is not None:
            options["credential_provider"] = credential_provider
        if self.tls:
            if ssl_ca_certs is not None:
                options["ssl_ca_certs"] = ssl_ca_certs
            if ssl_certfile is not None:
                options["ssl_certfile"] = ssl_certfile
            if ssl_keyfile is not None:
                options["ssl_keyfile"] = ssl_keyfile
            if insecure_skip_verify:
                logger.warning(
                    "TLS certificate verification is OFF for %s (insecure_skip_verify=True)",
                    mask_url(url),
                )
                options["ssl_cert_reqs"] = "none"
                options["ssl_check_hostname"] = False
        elif ssl_ca_certs or ssl_certfile or ssl_keyfile or insecure_skip_verify:
            raise ConfigurationError("TLS options need a rediss:// URL")
        self._options = options

    def command_client(
        self, timeout: float | None = None, setting: str = "command_timeout"
    ) -> aioredis.Redis:
        """Pooled client for commands: bounded retries with jittered backoff, no auth retry.

        Each command waits at most ``timeout`` (default ``command_timeout``) for its
        reply; a timeout is not retried (the server is there but silent), so a
        command fails within it. ``setting`` names that timeout in errors.

        Only for commands that are safe to send twice (a retry after a lost reply
        repeats the command): ``PUBLISH`` (receivers dedupe by sequence number),
        ``XACK``, ``XCLAIM``, reads, and scripts that check before they write."""
        retry = _Retry(ExponentialWithJitterBackoff(base=0.02, cap=0.5), retries=3)
        return _pack_with_hiredis(
            aioredis.Redis.from_url(
                self.url,
                socket_timeout=self.command_timeout if timeout is None else timeout,
                retry=retry,
                **self._options,
            ),
            setting,
        )

    def unretried_client(self, socket_timeout: float | None) -> aioredis.Redis:
        """Pooled client that never retries by itself: for ``XADD *`` (a blind retry
        after a lost reply stores the event twice) and blocking reads (whose loops
        reconnect, and re-read what a lost reply may have delivered).

        ``socket_timeout`` must exceed any ``BLOCK`` sent on it (redis-py applies it
        to the blocked read too)."""
        return _pack_with_hiredis(
            aioredis.Redis.from_url(
                self.url,
                socket_timeout=socket_timeout,
                retry=Retry(NoBackoff(), 0),
                **self._options,
            ),
            None,  # its readers' loops reconnect; the XADD writer has its own deadline
        )

    def push_pool(self) -> aioredis.ConnectionPool:
        """Pool for the single push connection: no socket timeout (a subscriber may idle
        for hours; the bus's own PING watchdog finds dead peers) and no retry, so a
        drop surfaces to the supervisor instead of a silent reconnect that hides the gap."""
        return aioredis.ConnectionPool.from_url(
            self.url, socket_timeout=None, retry=Retry(NoBackoff(), 0), **self._options
        )

    async def preflight(self) -> None:
        """PING once on a connection of its own, then close it: fails fast on
        credentials, TLS and reachability before anything else starts, and leaves
        no connection open (a process that only subscribes then holds exactly the
        push connection).

        :raises eventbus.errors.EventBusError: as :func:`translate` maps the failure.
        """
        client = self.command_client()
        try:
            with map_exceptions(command="PING", tls=self.tls, credentials=self.credentials):
                with anyio.move_on_after(self.connect_timeout) as scope:
                    await client.ping()
            if scope.cancelled_caught:
                raise self.timed_out("answer PING", self.connect_timeout, "connect_timeout")
        finally:
            with anyio.CancelScope(shield=True):
                await client.aclose()

    def timed_out(self, what: str, timeout: float, setting: str) -> RedisUnavailable:
        """The error for a Redis that did not ``what`` within ``timeout`` (the ``setting``)."""
        return RedisUnavailable(
            f"Redis at {self.address} did not {what} within {timeout:g}s ({setting})"
        )

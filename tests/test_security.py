"""RELIABILITY.md §5 and §7, security scenarios S1-S4 and S6: ACL, auth, TLS, code, injection.

ACL LOG, CLIENT LIST and INFO commandstats are server-wide, so every scenario that
reads them runs on its own redis-server (``redis_server_factory``). Never a mock.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import itertools
import logging
import ssl
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import anyio
import pytest
import redis.exceptions
from hypothesis import given
from hypothesis import strategies as st
from redis.crc import key_slot

import eventbus
from eventbus import EventBus, LivePolicy, Topic, _keys, errors, signals
from eventbus._connection import translate
from eventbus.testing import RedisServer, find_redis_server

from .security_helpers import (
    RotatingCredentials,
    TLSFiles,
    acl_log_count,
    admin_client,
    cause_chain,
    connections_of,
    exception_texts,
    log_texts,
    make_tls_files,
    wait_for_no_new_tasks,
    wait_until,
)

pytestmark = pytest.mark.security

#: Least-privilege ACL profile for the pub/sub part of eventbus (live topics and
#: pattern subscriptions). ``{prefix}`` is the bus's ``prefix``; ``{pattern}`` stands
#: for each pattern the app subscribes to (one ``&{prefix}:{{<pattern>}}`` per
#: pattern), because Redis checks a PSUBSCRIBE pattern against channel rules
#: *literally*: ``&{prefix}:*`` does not cover ``PSUBSCRIBE {prefix}:{{prices.*}}``.
#:
#: Found by removal: each rule below is needed (test_s1_every_profile_rule_is_needed),
#: and with exactly these the happy path runs with an empty ACL LOG. Not needed:
#: ``+hello`` (HELLO and AUTH carry Redis' no-auth flag, which ACL checks always let
#: through; verified with the ``default`` user at ``-@all`` too). Add
#: ``+client|setname`` if the bus is given ``client_name=``, and, on Redis >= 7.2,
#: ``+client|setinfo``: redis-py sends CLIENT SETINFO on every connect and tolerates
#: the refusal, but each refusal is an ACL LOG entry (on 7.0 the subcommand does not
#: exist, and ACL SETUSER rejects the rule).
PUBSUB_ACL_PROFILE: Final = (
    "on >{password} resetkeys resetchannels &{prefix}:* &{prefix}:{{{pattern}}} -@all "
    "+publish +subscribe +unsubscribe +psubscribe +punsubscribe +ping +client|id"
)

FAST_LIVE: Final = LivePolicy(ping_interval=0.5, ping_timeout=0.5, reconnect_backoff=0.05)
TOPIC: Final = "prices.eur"
PATTERN: Final = "prices.*"
OTHER_TOPIC: Final = "orders"  # not matched by PATTERN: only &<prefix>:* grants it
FAIL_FAST_S: Final = 2.0  # RELIABILITY.md §5.2 / S1-S3: refusals surface within 2 s
HANG_GUARD_S: Final = 10.0  # a bound on every wait, so a hang fails instead of timing out


def profile_rules(prefix: str, password: str, server: RedisServer) -> list[str]:
    """``PUBSUB_ACL_PROFILE`` filled in, plus what this server version needs."""
    rules = PUBSUB_ACL_PROFILE.format(prefix=prefix, password=password, pattern=PATTERN).split()
    if server.binary.version >= (7, 2):
        rules.append("+client|setinfo")
    return rules


async def set_user(admin: Any, user: str, rules: list[str]) -> None:
    await admin.execute_command("ACL", "SETUSER", user, "reset", *rules)


def user_url(server: RedisServer, user: str, password: str) -> str:
    scheme = "rediss" if server.tls else "redis"
    return f"{scheme}://{user}:{password}@127.0.0.1:{server.port}/0"


def channel_of(bus: EventBus, topic: str) -> str:
    return f"{bus.prefix}:{{{topic}}}"


async def pubsub_happy_path(bus: EventBus) -> None:
    """A handler, an iterator and a pattern subscription, each the only one of its route."""
    handled = anyio.Event()
    seen: list[dict[str, int]] = []

    @bus.on(OTHER_TOPIC)
    async def on_order(event: dict[str, int]) -> None:
        seen.append(event)
        handled.set()

    with anyio.fail_after(HANG_GUARD_S):
        async with (
            bus,
            bus.subscribe(TOPIC) as sub,
            bus.subscribe(Topic(PATTERN, pattern=True)) as psub,
        ):
            to_handler = await bus.publish(OTHER_TOPIC, {"o": 1})
            to_iterators = await bus.publish(TOPIC, {"p": 1})
            assert await sub.receive() == {"p": 1}
            assert await psub.receive() == {"p": 1}
            await handled.wait()
    assert seen == [{"o": 1}]
    assert to_handler.receivers == 1
    # Redis counts the one push connection twice: its channel and its matching pattern.
    assert to_iterators.receivers == 2


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[[str, object], None]:
    """Attach a measured number to the test's report (``user_properties``; JUnit XML
    shows them with ``-o junit_family=xunit1``). Unlike ``record_property`` it does not
    warn, and so does not error, under the default xunit2."""

    def record(name: str, value: object) -> None:
        request.node.user_properties.append((name, value))

    return record


async def wait_disconnected(admin: Any, user: str) -> float:
    """Wait until the server has no connection of ``user`` (so it read all they sent)."""

    async def gone() -> bool:
        return not await connections_of(admin, user)

    return await wait_until(gone, timeout=FAIL_FAST_S)


# -- S1: ACL matrix (pub/sub part) ------------------------------------------------------


@pytest.mark.parametrize("how", ["subscribe", "handler"])
async def test_s1_subscribe_without_channel_permission_fails_once_and_cleanly(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    measured: Callable[[str, object], None],
    how: str,
) -> None:
    server = redis_server_factory()
    user = "eb-nochan"
    bus = bus_factory(user_url(server, user, "pw"), live=FAST_LIVE)
    channel = channel_of(bus, TOPIC)
    # The profile with every channel rule dropped: `resetchannels` denies all.
    rules = [r for r in profile_rules(bus.prefix, "pw", server) if not r.startswith("&")]
    async with admin_client(server) as admin:
        await set_user(admin, user, rules)
        tasks_before = asyncio.all_tasks()
        start = time.monotonic()

        async def subscribe_refused() -> None:
            if how == "handler":

                @bus.on(TOPIC)
                async def never(event: object) -> None:
                    raise AssertionError("a refused subscription delivered an event")

                async with bus:
                    raise AssertionError("the bus opened without its handler's subscription")
            else:
                async with bus, bus.subscribe(TOPIC):
                    raise AssertionError("a refused subscription was entered")

        with anyio.fail_after(HANG_GUARD_S), pytest.raises(errors.PermissionDenied) as info:
            await subscribe_refused()
        elapsed = time.monotonic() - start
        measured("seconds_to_permission_denied", round(elapsed, 3))
        assert elapsed < FAIL_FAST_S

        exc = info.value
        assert exc.command == "SUBSCRIBE"
        assert exc.channel == channel
        assert channel in str(exc)
        assert exc.hint == f"&{bus.prefix}:*"  # the concrete rule to add, not a placeholder
        assert exc.hint in str(exc)

        # No partial startup: no connection of this user and no task outlives the failure.
        await wait_disconnected(admin, user)
        await wait_for_no_new_tasks(tasks_before, timeout=FAIL_FAST_S)
        # Exactly one attempt (NOPERM is not retried), and nothing else was refused.
        refused = await acl_log_count(admin, user=user, reason="channel", obj=channel)
        measured("acl_log_channel_denials", refused)
        assert refused == 1
        assert await acl_log_count(admin, user=user) == 1


async def test_s1_publish_without_publish_permission_names_the_command(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    measured: Callable[[str, object], None],
) -> None:
    server = redis_server_factory()
    user = "eb-nopub"
    bus = bus_factory(user_url(server, user, "pw"), live=FAST_LIVE)
    rules = [r for r in profile_rules(bus.prefix, "pw", server) if r != "+publish"]
    async with admin_client(server) as admin:
        await set_user(admin, user, rules)
        with anyio.fail_after(HANG_GUARD_S):
            async with bus:
                start = time.monotonic()
                with pytest.raises(errors.PermissionDenied) as info:
                    await bus.publish(TOPIC, {"p": 1})
                elapsed = time.monotonic() - start
        measured("seconds_to_permission_denied", round(elapsed, 3))
        assert elapsed < FAIL_FAST_S
        exc = info.value
        assert exc.command == "PUBLISH"
        assert "PUBLISH" in str(exc)
        assert exc.channel == channel_of(bus, TOPIC)
        assert exc.hint == "+publish"
        await wait_disconnected(admin, user)
        refused = await acl_log_count(admin, user=user, reason="command", obj="publish")
        measured("acl_log_publish_denials", refused)
        assert refused == 1  # not retried
        assert await acl_log_count(admin, user=user) == 1


async def test_s1_least_privilege_profile_runs_the_pubsub_happy_path(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
) -> None:
    server = redis_server_factory()
    user = "eb-app"
    bus = bus_factory(user_url(server, user, "pw"), live=FAST_LIVE)
    async with admin_client(server) as admin:
        await set_user(admin, user, profile_rules(bus.prefix, "pw", server))
        await pubsub_happy_path(bus)
        await wait_disconnected(admin, user)
        # Nothing refused and tolerated on the way (CLIENT SETINFO, UNSUBSCRIBE, ...).
        assert await acl_log_count(admin, user=user) == 0


PROFILE_GRANTS: Final = [
    pytest.param(rule, id=rule.format(prefix="<prefix>", pattern="<pattern>"))
    for rule in PUBSUB_ACL_PROFILE.split()
    if rule[0] in "&+"
]


REFUSED_ON_THE_WAY_OUT: Final = frozenset({"+unsubscribe", "+punsubscribe"})


@pytest.mark.parametrize("missing", PROFILE_GRANTS)
async def test_s1_every_profile_rule_is_needed(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    missing: str,
) -> None:
    """Without any one rule, the happy path is refused, and the error names that rule."""
    server = redis_server_factory()
    user = "eb-minus"
    bus = bus_factory(user_url(server, user, "pw"), live=FAST_LIVE)
    rule = missing.format(prefix=bus.prefix, pattern=PATTERN)
    rules = profile_rules(bus.prefix, "pw", server)
    rules.remove(rule)
    async with admin_client(server) as admin:
        await set_user(admin, user, rules)
        if rule in REFUSED_ON_THE_WAY_OUT:
            # UNSUBSCRIBE/PUNSUBSCRIBE: the bus does not wait for their replies, so the
            # happy path completes; the refusal shows in the server's ACL LOG below.
            await pubsub_happy_path(bus)
        else:
            with pytest.raises(errors.PermissionDenied) as info:
                await pubsub_happy_path(bus)
            assert info.value.hint == rule, str(info.value)
        await wait_disconnected(admin, user)
        assert await acl_log_count(admin, user=user) == 1


# -- S2: authentication ------------------------------------------------------------------


def assert_secret_absent(secret: str, *texts: str) -> None:
    for text in texts:
        assert secret not in text


@pytest.mark.parametrize("failure", ["wrong-password", "disabled-user"])
async def test_s2_bad_credentials_fail_fast_once_and_never_fall_back(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    caplog: pytest.LogCaptureFixture,
    measured: Callable[[str, object], None],
    failure: str,
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"canary-{uuid.uuid4().hex}"
    server = redis_server_factory()  # its `default` user is `nopass +@all`: a fallback works
    user = "eb-auth"
    bus = bus_factory(user_url(server, user, canary), live=FAST_LIVE)
    rules = profile_rules(bus.prefix, canary, server)
    if failure == "wrong-password":
        rules[rules.index(f">{canary}")] = f">right-{uuid.uuid4().hex}"
    else:
        rules[rules.index("on")] = "off"

    @bus.on(TOPIC)
    async def never(event: object) -> None:
        raise AssertionError("delivered without authenticating")

    async with admin_client(server) as admin:
        await set_user(admin, user, rules)
        admin_id = await admin.client_id()
        start = time.monotonic()
        with anyio.fail_after(HANG_GUARD_S), pytest.raises(errors.AuthenticationFailed) as info:
            async with bus:
                raise AssertionError("the bus opened with bad credentials")
        elapsed = time.monotonic() - start
        measured("seconds_to_auth_failed", round(elapsed, 3))
        assert elapsed < FAIL_FAST_S

        failures = await acl_log_count(admin, user=user, reason="auth")
        measured("acl_log_auth_failures", failures)
        assert 1 <= failures <= 2  # not redis-py's retry loop
        # Never the default user instead: no connection but ours, nothing refused to it.
        others = [c for c in await admin.client_list() if int(c["id"]) != admin_id]
        assert others == []
        assert await acl_log_count(admin, user="default") == 0

    assert_secret_absent(
        canary,
        repr(bus),
        bus.url,
        exception_texts(info.value),
        log_texts(caplog.records),
        caplog.text,
    )
    assert "***" in repr(bus)


async def test_s2_password_never_in_logs_repr_or_errors_on_a_working_bus(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    canary = f"canary-{uuid.uuid4().hex}"
    server = redis_server_factory()
    user = "eb-canary"
    bus = bus_factory(user_url(server, user, canary), live=FAST_LIVE)
    rules = [r for r in profile_rules(bus.prefix, canary, server) if r != "+publish"]
    async with admin_client(server) as admin:
        await set_user(admin, user, rules)
        with anyio.fail_after(HANG_GUARD_S):
            async with bus, bus.subscribe(TOPIC):
                with pytest.raises(errors.PermissionDenied) as info:
                    await bus.publish(TOPIC, {"p": 1})
                assert "***" in repr(bus)
                assert_secret_absent(canary, repr(bus), bus.url)
    assert caplog.records  # the DEBUG capture did see the connection's life
    assert_secret_absent(
        canary, exception_texts(info.value), log_texts(caplog.records), caplog.text, repr(bus)
    )


async def test_s2_rotated_password_closes_the_subscription_with_auth_error(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    measured: Callable[[str, object], None],
) -> None:
    server = redis_server_factory()
    user = "eb-rot"
    bus = bus_factory(user_url(server, user, "old"), live=FAST_LIVE)
    async with admin_client(server) as admin:
        await set_user(admin, user, profile_rules(bus.prefix, "old", server))
        tasks_before = asyncio.all_tasks()
        with anyio.fail_after(HANG_GUARD_S):
            async with bus, bus.subscribe(TOPIC) as sub:
                await admin.execute_command("ACL", "SETUSER", user, "resetpass", ">new")
                start = time.monotonic()
                # A subscribe-only bus holds ONE connection: the push connection.
                assert await admin.execute_command("CLIENT", "KILL", "USER", user) == 1
                with pytest.raises(errors.AuthenticationFailed):
                    await sub.receive()
                elapsed = time.monotonic() - start
                measured("seconds_to_auth_failed_after_kill", round(elapsed, 3))
                assert elapsed < 3.0

                with pytest.raises(errors.AuthenticationFailed):  # the command side too
                    await bus.publish(TOPIC, {"p": 1})
                # No silent retry loop: the push supervisor (and every task it ran) ended
                # while the bus is still open, after one failed HELLO per connection.
                await wait_for_no_new_tasks(tasks_before, timeout=FAIL_FAST_S)
                assert bus.reconnects == 0
                failures = await acl_log_count(admin, user=user, reason="auth")
                measured("acl_log_auth_failures", failures)
                assert failures == 2


async def test_s2_credential_provider_recovers_from_rotation_within_2s(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    measured: Callable[[str, object], None],
) -> None:
    server = redis_server_factory()
    user = "eb-prov"
    creds = RotatingCredentials(user, "old")
    bus = bus_factory(
        f"redis://127.0.0.1:{server.port}/0", credential_provider=creds, live=FAST_LIVE
    )
    reconnected = anyio.Event()
    bus.connect_signal(signals.reconnected, lambda sender, **kw: reconnected.set())
    async with admin_client(server) as admin:
        await set_user(admin, user, profile_rules(bus.prefix, "old", server))
        with anyio.fail_after(HANG_GUARD_S):
            async with bus, bus.subscribe(TOPIC) as sub:
                await bus.publish(TOPIC, {"n": 1})
                assert await sub.receive() == {"n": 1}

                await admin.execute_command("ACL", "SETUSER", user, "resetpass", ">new")
                creds.password = "new"
                start = time.monotonic()
                assert await admin.execute_command("CLIENT", "KILL", "USER", user) == 2
                await reconnected.wait()
                recovery = time.monotonic() - start
                measured("seconds_to_recover", round(recovery, 3))
                assert recovery <= 2.0

                await bus.publish(TOPIC, {"n": 2})
                assert await sub.receive() == {"n": 2}
        assert bus.reconnects == 1
        assert await acl_log_count(admin, user=user) == 0


# -- S3: TLS -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory: pytest.TempPathFactory) -> TLSFiles:
    return make_tls_files(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def tls_server_factory(
    redis_server_factory: Callable[..., RedisServer], tls_files: TLSFiles
) -> Callable[..., RedisServer]:
    """Servers with ``--port 0 --tls-port P`` (plaintext impossible); skips without TLS."""
    binary = find_redis_server()
    if not binary.tls:
        pytest.skip(
            f"redis-server {binary.version_str} at {binary.path} was built without TLS "
            "(BUILD_TLS=yes); set EVENTBUS_REDIS_SERVER to one with TLS for S3"
        )

    def factory(cert: str | None = None, key: str | None = None, **kwargs: Any) -> RedisServer:
        tls = (cert or tls_files.server_cert, key or tls_files.server_key, tls_files.ca)
        return redis_server_factory(tls=tls, **kwargs)

    return factory


def handshake_failures(server: RedisServer, marker: str) -> int:
    """Server-side TLS accept errors containing ``marker`` (from its log file)."""
    lines = server.log_path.read_text(errors="replace").splitlines()
    return sum("Error accepting a client connection" in line and marker in line for line in lines)


# A plaintext client on a TLS port: the server's OpenSSL reads "*3\r\n..." as a TLS record.
PLAINTEXT_MARKER: Final = "wrong version number"


async def test_s3_valid_ca_runs_pubsub_over_tls_only(
    tls_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    tls_files: TLSFiles,
) -> None:
    server = tls_server_factory()
    assert server.url.startswith("rediss://")
    bus = bus_factory(server.url, ssl_ca_certs=tls_files.ca, live=FAST_LIVE)
    async with admin_client(server, ssl_ca_certs=tls_files.ca) as admin:
        assert (await admin.config_get("port"))["port"] == "0"  # no plaintext listener
        with anyio.fail_after(HANG_GUARD_S):
            async with bus, bus.subscribe(TOPIC) as sub:
                await bus.publish(TOPIC, {"p": 1})
                assert await sub.receive() == {"p": 1}
                ids = {int(c["id"]) for c in await admin.client_list()}
                assert bus.push_client_id in ids  # the push connection, over TLS
                assert len(ids) == 3  # admin, command client, push connection
                # The durable writer's own connection (hiredis-packed) is TLS too.
                durable = Topic("audit", durable=True)
                receipt = await bus.publish(durable, {"p": 2})
                stream = _keys.topic_keys(bus.prefix, "audit").stream
                assert [e[0] for e in await admin.xrange(stream)] == [receipt.stream_id]
    assert handshake_failures(server, PLAINTEXT_MARKER) == 0


@pytest.mark.parametrize("mistake", ["wrong-ca", "name-mismatch"])
async def test_s3_untrusted_certificate_fails_with_tls_error(
    tls_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    tls_files: TLSFiles,
    measured: Callable[[str, object], None],
    mistake: str,
) -> None:
    if mistake == "wrong-ca":
        server = tls_server_factory()
        bus = bus_factory(server.url, ssl_ca_certs=tls_files.other_ca, live=FAST_LIVE)
    else:  # a certificate from the right CA, but for redis.example.org, not 127.0.0.1
        server = tls_server_factory(tls_files.mismatch_cert, tls_files.mismatch_key)
        bus = bus_factory(server.url, ssl_ca_certs=tls_files.ca, live=FAST_LIVE)
    start = time.monotonic()
    with anyio.fail_after(HANG_GUARD_S), pytest.raises(errors.TLSError) as info:
        async with bus:
            raise AssertionError("connected to an untrusted server")
    elapsed = time.monotonic() - start
    measured("seconds_to_tls_error", round(elapsed, 3))
    assert elapsed < FAIL_FAST_S
    assert isinstance(info.value, errors.RedisUnavailable)
    assert any(isinstance(e, ssl.SSLCertVerificationError) for e in cause_chain(info.value))
    assert "certificate" in str(info.value)
    # No plaintext fallback: the server never saw a non-TLS hello.
    assert handshake_failures(server, PLAINTEXT_MARKER) == 0


async def test_s3_plaintext_url_to_tls_port_fails_clearly(
    tls_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    measured: Callable[[str, object], None],
) -> None:
    server = tls_server_factory()
    bus = bus_factory(f"redis://127.0.0.1:{server.port}/0", live=FAST_LIVE)
    start = time.monotonic()
    with anyio.fail_after(HANG_GUARD_S), pytest.raises(errors.RedisUnavailable) as info:
        async with bus:
            raise AssertionError("a plaintext client got through to a TLS port")
    elapsed = time.monotonic() - start
    measured("seconds_to_error", round(elapsed, 3))
    assert elapsed < FAIL_FAST_S
    assert "TLS" in str(info.value)  # says what is wrong: the server expects TLS
    attempts = handshake_failures(server, PLAINTEXT_MARKER)
    measured("plaintext_attempts", attempts)
    assert attempts >= 1  # (the detector the other S3 tests rely on does see plaintext)


async def test_s3_insecure_skip_verify_works_and_warns(
    tls_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    tls_files: TLSFiles,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="eventbus")
    server = tls_server_factory()
    bus = bus_factory(server.url, ssl_ca_certs=tls_files.other_ca, insecure_skip_verify=True)
    warnings = [
        r
        for r in caplog.records
        if r.name == "eventbus"
        and r.levelno == logging.WARNING
        and "verification" in r.getMessage()
    ]
    assert warnings, "insecure_skip_verify=True must log a WARNING"
    with anyio.fail_after(HANG_GUARD_S):
        async with bus, bus.subscribe(TOPIC) as sub:
            await bus.publish(TOPIC, {"p": 1})
            assert await sub.receive() == {"p": 1}


async def test_s3_mutual_tls_needs_the_client_certificate(
    tls_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
    tls_files: TLSFiles,
    measured: Callable[[str, object], None],
) -> None:
    # RedisServer passes "--tls-auth-clients no"; options given later win.
    server = tls_server_factory(extra_args=["--tls-auth-clients", "yes"])
    client_cert = {"ssl_certfile": tls_files.client_cert, "ssl_keyfile": tls_files.client_key}
    async with admin_client(server, ssl_ca_certs=tls_files.ca, **client_cert) as admin:
        assert (await admin.config_get("tls-auth-clients"))["tls-auth-clients"] == "yes"

    with_cert = bus_factory(server.url, ssl_ca_certs=tls_files.ca, live=FAST_LIVE, **client_cert)
    with anyio.fail_after(HANG_GUARD_S):
        async with with_cert, with_cert.subscribe(TOPIC) as sub:
            await with_cert.publish(TOPIC, {"p": 1})
            assert await sub.receive() == {"p": 1}

    without = bus_factory(server.url, ssl_ca_certs=tls_files.ca, live=FAST_LIVE)
    start = time.monotonic()
    with anyio.fail_after(HANG_GUARD_S), pytest.raises(errors.RedisUnavailable) as info:
        async with without:
            raise AssertionError("mTLS server accepted a client without a certificate")
    elapsed = time.monotonic() - start
    measured("seconds_to_error", round(elapsed, 3))
    assert elapsed < FAIL_FAST_S
    # TLS 1.3 checks the client certificate after the handshake: the client reads
    # the server's "certificate required" alert (TLSError), or, about 1 time in 5
    # here, a reset that overtook it. Either way the message says what is missing.
    exc = info.value
    measured("error_type", type(exc).__name__)
    assert "certificate" in str(exc)
    if isinstance(exc, errors.TLSError):
        assert any(isinstance(e, ssl.SSLError) for e in cause_chain(exc))
    else:
        assert any(isinstance(e, ConnectionResetError) for e in cause_chain(exc))


@pytest.mark.parametrize("tls", [True, False, None], ids=["rediss", "redis", "unknown"])
def test_s3_reset_on_connect_hint_fits_the_scheme(tls: bool | None) -> None:
    """The 1-in-5 outcome above, made deterministic: a TLS client is never told to
    switch to rediss://, a plaintext one is, and an unknown one hears both causes."""
    reset = redis.exceptions.ConnectionError(
        "Error while reading from 127.0.0.1:6379 : (104, 'Connection reset by peer')"
    )
    message = str(translate(reset, tls=tls))
    assert ("client certificate" in message) is (tls is not False)
    assert ("rediss://" in message) is (tls is not True)


# -- S4: no unsafe deserialisation or dynamic code -----------------------------------------

UNSAFE_MODULES: Final = frozenset(
    {"pickle", "cPickle", "_pickle", "cloudpickle", "dill", "jsonpickle", "marshal", "shelve"}
)
UNSAFE_YAML: Final = frozenset({"load", "load_all", "unsafe_load", "unsafe_load_all", "full_load"})
UNSAFE_BUILTINS: Final = frozenset({"eval", "exec", "__import__"})


def unsafe_uses(source: str, filename: str = "<source>") -> list[str]:
    """Every import or call in ``source`` that can run code named by data."""
    found: list[str] = []

    def flag(node: ast.AST, what: str) -> None:
        found.append(f"{filename}:{getattr(node, 'lineno', '?')}: {what}")

    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                root = alias.name.split(".")[0]
                if root in UNSAFE_MODULES or root == "importlib":
                    flag(node, f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom):
            root = (node.module or "").split(".")[0]
            names = {a.name for a in node.names}
            if root in UNSAFE_MODULES or root == "importlib":
                flag(node, f"from {node.module} import ...")
            elif root == "yaml" and names & UNSAFE_YAML:
                flag(node, f"from yaml import {', '.join(sorted(names & UNSAFE_YAML))}")
            elif root == "builtins" and names & UNSAFE_BUILTINS:
                flag(node, "from builtins import eval/exec")
        elif isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name) and func.id in UNSAFE_BUILTINS:
                flag(node, f"{func.id}()")
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                owner, attr = func.value.id, func.attr
                if owner == "yaml" and attr in UNSAFE_YAML:
                    flag(node, f"yaml.{attr}()")
                elif owner == "builtins" and attr in UNSAFE_BUILTINS:
                    flag(node, f"builtins.{attr}()")
                elif owner in UNSAFE_MODULES or owner == "importlib":
                    flag(node, f"{owner}.{attr}()")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "builtins"
            and node.attr in UNSAFE_BUILTINS
        ):
            flag(node, f"builtins.{node.attr}")
    return found


@pytest.mark.parametrize(
    "snippet",
    [
        "import pickle",
        "import cPickle as p",
        "from marshal import loads",
        "import shelve",
        "import dill.detect",
        "import yaml\nyaml.load(data)",
        "import yaml\nyaml.unsafe_load(data)",
        "from yaml import load",
        "eval(payload)",
        "exec(code)",
        "import builtins\nf = builtins.eval",
        "import importlib\nimportlib.import_module(name)",
        "from importlib import import_module",
        "__import__(name)",
    ],
)
def test_s4_the_audit_catches(snippet: str) -> None:
    assert unsafe_uses(snippet), f"the S4 audit missed: {snippet!r}"


def test_s4_the_audit_allows_safe_code() -> None:
    safe = "import json, re\nimport yaml\nyaml.safe_load(s)\nre.compile(p)\njson.loads(b)\n"
    assert unsafe_uses(safe) == []


RUNNER_IMPORTS: Final = frozenset(
    {"import importlib", "import importlib.util", "importlib.import_module()"}
)
"""What ``eventbus/_runner.py`` may use: ``eventbus run pkg.mod:bus`` imports the module
its operator names on the command line (as ``python -m`` would), never a name read
from Redis or from an event."""


def test_s4_package_has_no_unsafe_deserialisation_or_dynamic_code() -> None:
    package = Path(eventbus.__file__).parent
    files = sorted(package.rglob("*.py"))
    assert len(files) >= 10  # the whole package, testing/ included
    found = [
        u
        for f in files
        for u in unsafe_uses(f.read_text(encoding="utf-8"), str(f))
        if not (f.name == "_runner.py" and u.split(": ", 1)[1] in RUNNER_IMPORTS)
    ]
    assert found == []
    runner = unsafe_uses((package / "_runner.py").read_text(encoding="utf-8"))
    assert {u.split(": ", 1)[1] for u in runner} <= RUNNER_IMPORTS


# -- S6: topic and key injection ---------------------------------------------------------

BAD_TOPICS: Final = [
    "",
    "a*",
    "a?",
    "[a]",
    "x{y}z",
    "a:b",
    "../x",
    "a\r\nFLUSHALL",
    "a" * 10_000,
    "é",
    "\x00",
]


def _topic_id(name: str) -> str:
    return repr(name) if len(name) <= 20 else f"{name[0]!r}*{len(name)}"


@pytest.mark.parametrize("name", BAD_TOPICS, ids=_topic_id)
def test_s6_topic_rejects_injection(name: str) -> None:
    with pytest.raises(errors.InvalidTopic) as info:
        Topic(name)
    assert isinstance(info.value, ValueError)
    message = str(info.value)
    for control in "\r\n\x00":  # shown escaped: a topic cannot forge a log line
        assert control not in message
    assert len(message) < 300


async def test_s6_bad_topics_are_rejected_before_any_io(
    redis_server_factory: Callable[..., RedisServer],
    bus_factory: Callable[..., EventBus],
) -> None:
    server = redis_server_factory()
    bus = bus_factory(server.url)

    async def command_calls(admin: Any) -> dict[str, int]:
        stats = await admin.info("commandstats")
        return {k: int(v["calls"]) for k, v in stats.items() if k != "cmdstat_info"}

    async with admin_client(server) as admin, bus:
        before = await command_calls(admin)
        for name in BAD_TOPICS:
            with pytest.raises(errors.InvalidTopic):
                await bus.publish(name, {"p": 1})
            with pytest.raises(errors.InvalidTopic):
                bus.subscribe(name)
            with pytest.raises(errors.InvalidTopic):
                bus.on(name)
        after = await command_calls(admin)
        assert after == before  # nothing reached Redis: no PUBLISH, no SUBSCRIBE
        # ... and the probe does see a publish that does happen.
        await bus.publish(TOPIC, {"p": 1})
        assert (await command_calls(admin))["cmdstat_publish"] == before.get(
            "cmdstat_publish", 0
        ) + 1


_PREFIXES = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
_TOPICS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}", fullmatch=True)
_PAIRS = st.tuples(_PREFIXES, _TOPICS)
# Few letters, so that two pairs whose names could run together are drawn often.
_NARROW = st.from_regex(r"[a1][a1._-]{0,5}", fullmatch=True)
_NARROW_PAIRS = st.tuples(_NARROW, _NARROW)


def _topic_name_builders() -> list[Callable[[str, str], Any]]:
    """Every builder in eventbus._keys of a name from (prefix, topic)."""
    builders = [
        fn
        for _, fn in inspect.getmembers(_keys, inspect.isfunction)
        if fn.__module__ == _keys.__name__
        and list(inspect.signature(fn).parameters) == ["prefix", "topic"]
    ]
    assert _keys.live_channel in builders
    assert _keys.topic_keys in builders
    return builders


def _hash_tag(name: str) -> str | None:
    """The part of ``name`` Redis Cluster hashes, if it has a hash tag (Redis' rule)."""
    start = name.find("{")
    if start < 0:
        return None
    end = name.find("}", start + 1)
    if end <= start + 1:
        return None
    return name[start + 1 : end]


def _assert_injective(pairs: list[tuple[str, str]]) -> None:
    for build in _topic_name_builders():
        owners: dict[str, tuple[str, str]] = {}
        for pair in pairs:
            name = build(*pair)
            assert owners.setdefault(name, pair) == pair, (
                f"{build.__name__}: {owners[name]} and {pair} both build {name!r}"
            )


@given(pairs=st.lists(st.one_of(_NARROW_PAIRS, _PAIRS), min_size=2, max_size=30, unique=True))
def test_s6_key_builder_is_injective(pairs: list[tuple[str, str]]) -> None:
    _assert_injective(pairs)


def test_s6_key_builder_is_injective_exhaustively_on_a_small_alphabet() -> None:
    # Every name of 1-4 characters over "a", ".", "-": all ways to split one string.
    names = ["a" + "".join(rest) for n in range(4) for rest in itertools.product("a.-", repeat=n)]
    _assert_injective([(prefix, topic) for prefix in names for topic in names])


@given(pair=_PAIRS, other=_PREFIXES)
def test_s6_channel_topic_inverts_live_channel(pair: tuple[str, str], other: str) -> None:
    prefix, topic = pair
    channel = _keys.live_channel(prefix, topic)
    assert _keys.validate_prefix(prefix) == prefix
    assert Topic(topic).name == topic  # the alphabet drawn is the allowed one
    assert _keys.channel_topic(prefix, channel) == topic
    if other != prefix:  # another namespace never claims this channel
        assert _keys.channel_topic(other, channel) is None


@given(pair=_PAIRS)
def test_s6_every_name_of_a_topic_carries_its_hash_tag(pair: tuple[str, str]) -> None:
    prefix, topic = pair
    for build in _topic_name_builders():
        built = build(prefix, topic)
        # topic_keys() builds every key of a durable topic at once.
        for name in built if isinstance(built, tuple) else (built,):
            assert _hash_tag(name) == topic
            assert key_slot(name.encode()) == key_slot(topic.encode())


def test_s6_tenant_collision_names_are_rejected() -> None:
    # The classic tenant collision, ("a", "b:c") vs ("a:b", "c"), needs ":" in a
    # name: the allow-lists (and so the strategies above) forbid it on both sides.
    with pytest.raises(errors.InvalidTopic):
        Topic("b:c")
    with pytest.raises(errors.ConfigurationError):
        _keys.validate_prefix("a:b")
    assert _keys.live_channel("a", "b.c") != _keys.live_channel("a.b", "c")

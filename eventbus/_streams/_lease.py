"""The lease a consumer-group member holds on its consumer name while it runs.

Two members running under one consumer name would share one pending list: each
re-reads "its own" pending entries, heartbeats them and acks them, so each takes
the other's entries for its own and nothing tells them apart (RELIABILITY.md F30).
So a member takes a lease on its name before it reads anything: ``SET <lease>
<token> NX PX <ttl>`` (the key is :func:`~eventbus._keys.member_lease`, the token
``<host>/<pid>/<random>``), renews it every third of the TTL while it runs (the
``LEASE_RENEW`` script: only while the token is its own), and deletes it when it
leaves (``LEASE_RELEASE``: compare-and-delete).

A start that finds the name held cannot tell at once a live holder (a second
process with the same name: refused, :class:`~eventbus.errors.ConsumerNameInUse`)
from a crashed one whose lease has not lapsed yet (a restart under the same name
after a SIGKILL, which must get its name back, and soon: it finishes its own
pending entries before ``claim_idle`` lets others claim them). Waiting tells:
for at most about one TTL it polls the lease; a live holder renews it (its TTL
goes up, or another token appears), a crashed one lets it lapse.

``LEASE_TTL`` is 3 s:

* a restart under the same name waits at most that long (less the time since the
  crash), far below any sensible ``claim_idle`` (30 s by default), so it takes back
  its own entries before anyone claims them;
* a duplicate start is refused within one renewal period (1 s) plus a poll;
* a member loses its name only if it goes silent for more than 3 s (frozen,
  partitioned) *and* another one starts under the name meanwhile; a lease that
  lapsed with nobody waiting is simply taken again by the next renewal. Shorter
  would refuse nothing sooner and make stalls costlier; longer delays restarts.

Renewal runs on its own timer, not the claimer's: ``ClaimPolicy.interval`` may be
longer than the TTL, and the claimer stops when the member begins to stop, while
the lease must last until its last ack is written.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from collections.abc import Callable
from typing import Any, Final

import anyio
import redis.exceptions as rex

from .._connection import CONNECTION_ERRORS, map_exceptions
from .._scripts import LEASE_RELEASE, LEASE_RENEW
from ..errors import ConsumerNameInUse

__all__ = ["LEASE_TTL", "MemberLease"]

logger = logging.getLogger("eventbus")

LEASE_TTL: Final = 3.0
"""Seconds a consumer-name lease lives without renewal (see the module doc)."""
_RENEW_EVERY: Final = LEASE_TTL / 3
_POLL: Final = 0.1
"""Seconds between looks at a held lease while a start waits for it to lapse."""
_WAIT_SLACK: Final = 1.0
"""How much longer than one TTL a start waits before it gives up."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class MemberLease:
    """One member's lease on its consumer name (see the module doc)."""

    def __init__(
        self,
        *,
        client: Any,
        key: str,
        topic: str,
        group: str,
        consumer: str,
        on_lost: Callable[[str], None],
    ) -> None:
        self._client = client
        self._key = key
        self._topic = topic
        self._group = group
        self._consumer = consumer
        self._on_lost = on_lost
        self.token = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self._ttl_ms = int(LEASE_TTL * 1000)
        self._renew = client.register_script(LEASE_RENEW)
        self._release = client.register_script(LEASE_RELEASE)
        self._scope = anyio.CancelScope()
        self.held = False
        """Whether this member holds the lease (taken, and not lost or released)."""

    async def acquire(self) -> None:
        """Take the lease; if it is held, wait for it to lapse, at most about one TTL.

        :raises eventbus.errors.ConsumerNameInUse: the holder renewed it meanwhile
            (it is alive), or it has no expiry.
        """
        deadline = anyio.current_time() + LEASE_TTL + _WAIT_SLACK
        last: tuple[str, int] | None = None
        while True:
            with map_exceptions(topic=self._topic, command="SET"):
                if await self._client.set(self._key, self.token, nx=True, px=self._ttl_ms):
                    self.held = True
                    return
                async with self._client.pipeline(transaction=False) as pipe:
                    pipe.get(self._key)
                    pipe.pttl(self._key)
                    raw, pttl = await pipe.execute()
            if raw is None or pttl == -2:
                continue  # lapsed between the two calls: try again at once
            holder = _text(raw)
            if holder == self.token:
                # Our SET went through and its reply was lost; the retry found our own lease.
                self.held = True
                return
            renewed = last is not None and (holder != last[0] or pttl > last[1])
            if pttl == -1 or renewed or anyio.current_time() >= deadline:
                raise ConsumerNameInUse(
                    topic=self._topic, group=self._group, consumer=self._consumer, holder=holder
                )
            if last is None:
                logger.info(
                    "group %r of topic %r: consumer name %r is held by %r; waiting up to %.0fs"
                    " for its lease to lapse (a crashed member's does, a live one's is renewed)",
                    self._group,
                    self._topic,
                    self._consumer,
                    holder,
                    LEASE_TTL,
                )
            last = (holder, pttl)
            await anyio.sleep(min(_POLL, pttl / 1000 + 0.001))

    async def run(self) -> None:
        """Renew the lease every third of its TTL until :meth:`stop` or until it is lost;
        losing it (another token holds it) calls ``on_lost`` with the holder, once."""
        with self._scope:
            while self.held:
                await anyio.sleep(_RENEW_EVERY)
                try:
                    status, holder = await self._renew(
                        keys=[self._key], args=[self.token, self._ttl_ms]
                    )
                except rex.ResponseError as exc:
                    logger.warning(
                        "group %r: renewing the lease of consumer %r failed: %s",
                        self._group,
                        self._consumer,
                        exc,
                    )
                    continue
                except CONNECTION_ERRORS as exc:
                    # The next tick tries again; a lease that lapsed meanwhile with
                    # nobody waiting for it is taken again then (status 2).
                    logger.debug("group %r: lease renewal failed: %s", self._group, exc)
                    continue
                if status == 2:
                    logger.warning(
                        "group %r of topic %r: the lease of consumer name %r was gone (this"
                        " member was frozen or cut off for over %.0fs, or the key was deleted);"
                        " nobody else held it, so it was taken again",
                        self._group,
                        self._topic,
                        self._consumer,
                        LEASE_TTL,
                    )
                elif status == 0:
                    self.held = False
                    self._on_lost(_text(holder))

    def stop(self) -> None:
        """End :meth:`run` (at once; the lease stays until :meth:`release` or its TTL)."""
        self._scope.cancel()

    async def release(self) -> None:
        """Delete the lease if it is still ours, so a successor under the same name
        starts at once. A failure is harmless: the lease lapses within its TTL."""
        if not self.held:
            return
        self.held = False
        try:
            await self._release(keys=[self._key], args=[self.token])
        except (rex.RedisError, OSError) as exc:
            logger.debug("group %r: releasing the consumer-name lease failed: %s", self._group, exc)

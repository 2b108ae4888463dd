"""The schedulers' lease: one scheduler of a prefix releases, the others stand by.

Any number of schedulers may run; each event is released exactly once whatever
they do, because the release scripts are atomic (``DELAYED_RELEASE`` removes what
it writes, ``RECURRING_FIRE`` is a compare-and-set). The lease is only about
lateness: schedulers that all wake at every due time race for the same events and
share the CPU, and each release comes later than one scheduler alone would make it.
So one of them, the leader, holds a lease and releases on time; the others, hot
standbys, release only what is overdue by more than ``STANDBY_LAG``.

The lease is one key, :func:`~eventbus._keys.delayed_lease`
(``{prefix}:delayed:lease``), whose value is the holder's token
(``<host>/<pid>/<random>``) and whose TTL is ``LEASE_TTL``. Every scheduler calls
the ``LEASE_RENEW`` script every ``RENEW_EVERY`` (the script the consumer-name
leases use): it renews the lease if the token is the caller's, takes it if nobody
holds it (``SET ... PX`` when absent, as ``SET NX PX``) and otherwise names the
holder and writes nothing. A leader whose renewal finds another token steps down
at once; one whose renewals fail (Redis unreachable) counts itself leader only
until one TTL after it sent the last renewal that succeeded. A scheduler that
stops deletes its lease (``LEASE_RELEASE``, compare-and-delete) and publishes on
the wake channel, so a standby takes over at once.

Bounds (the server's clock, as everything delayed):

* leader SIGKILLed, frozen or cut off: its lease lapses at most ``LEASE_TTL`` (2 s)
  after its last renewal, and a standby takes it at its next attempt, at most
  ``RENEW_EVERY`` (0.5 s) later: a new leader within 2.5 s;
* meanwhile, and whenever a leader holds the lease but does not release (stuck,
  or slower than the events fall due), standbys release every event overdue by
  more than ``STANDBY_LAG`` (0.1 s): no event waits for the takeover;
* no holder at all (every scheduler cut off from the key by an ACL): each runs as
  if it were the only one (:attr:`SchedulerLease.enabled` false), as schedulers
  ran before the lease.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from typing import Any, Final

import redis.exceptions as rex

from .._scripts import LEASE_RELEASE, LEASE_RENEW

__all__ = ["LEASE_TTL", "RENEW_EVERY", "STANDBY_LAG", "SchedulerLease"]

logger = logging.getLogger("eventbus")

LEASE_TTL: Final = 2.0
"""Seconds the lease lives without renewal: how long a dead leader keeps it."""
RENEW_EVERY: Final = 0.5
"""Seconds between two renewals by the leader, and two attempts by a standby."""
STANDBY_LAG: Final = 0.1
"""A standby releases what is overdue by more than this many seconds: the bound
of lateness while no live leader releases. Short, so that a dead leader's events
do not wait for the takeover (F18: p99 under 0.25 s with the leader SIGKILLed);
long enough that a standby looks only ten times a second while the leader keeps
up, and that a leader on a busy machine is rarely overtaken (harmless when it is:
the release scripts release each event once)."""


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class SchedulerLease:
    """One scheduler's view of the lease (see the module doc)."""

    def __init__(self, client: Any, key: str) -> None:
        self._key = key
        self.token = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:12]}"
        self._ttl_ms = int(LEASE_TTL * 1000)
        self._renew = client.register_script(LEASE_RENEW)
        self._release = client.register_script(LEASE_RELEASE)
        self.enabled = True
        """False once an ACL refused the lease key: then this scheduler releases
        everything on time, as if it were alone (the release scripts keep it exact)."""
        self._held_until = 0.0
        """Monotonic time until which the lease is surely ours (0: not held)."""
        self.next_attempt = 0.0
        """Monotonic time of the next renewal (leader) or attempt (standby)."""
        self.holder: str | None = None
        """The token of the holder, as last seen."""

    @property
    def leader(self) -> bool:
        """Whether this scheduler holds the lease now (as far as it can know)."""
        return self.enabled and time.monotonic() < self._held_until

    @property
    def lag_ms(self) -> float:
        """How overdue an event must be before this scheduler releases it (ms)."""
        return 0.0 if not self.enabled or self.leader else STANDBY_LAG * 1000

    def due(self) -> bool:
        return self.enabled and time.monotonic() >= self.next_attempt

    async def hold(self, client: Any, *, force: bool = False) -> bool:
        """Renew the lease, or try to take it, if that is due (or ``force``d);
        whether this scheduler's role changed.

        :raises redis.exceptions.RedisError: Redis did not answer (the caller retries);
            an ACL refusal of the key is not raised: it disables the lease.
        """
        if not self.enabled or not (force or self.due()):
            return False
        was = self.leader
        sent = time.monotonic()
        self.next_attempt = sent + RENEW_EVERY
        try:
            status, holder = await self._renew(
                keys=[self._key], args=[self.token, self._ttl_ms], client=client
            )
        except rex.ResponseError as exc:
            # NOPERM: refused before the script ran (Redis 7), or by its call (6.2)
            if not isinstance(exc, rex.NoPermissionError) and "NOPERM" not in str(exc):
                raise
            self.enabled = False
            self._held_until = 0.0
            logger.warning(
                "delayed-event scheduler: the lease %s is refused (%s); this scheduler"
                " releases every due event itself, racing any others (each event is"
                " still released once, only later)",
                self._key,
                exc,
            )
            return True
        self.holder = _text(holder)
        if int(status) == 0:
            self._held_until = 0.0
            if was:
                logger.info(
                    "delayed-event scheduler: the lease is held by %s now; this one"
                    " steps down and stands by",
                    self.holder,
                )
        else:
            self._held_until = sent + LEASE_TTL
            if not was:
                logger.debug("delayed-event scheduler %s leads", self.token)
        return self.leader != was

    async def release(self, client: Any) -> bool:
        """Delete the lease if it is ours; whether it was."""
        if not self.enabled or not self._held_until:
            return False
        self._held_until = 0.0
        return bool(int(await self._release(keys=[self._key], args=[self.token], client=client)))

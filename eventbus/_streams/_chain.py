"""Chaining: a handler's return value published to ``publish_to``, with its input acked.

To a durable target, the outputs are written and the input acked in one script
(``ACK_PUBLISH``): either both happen or neither, and only while the input is
still pending with the group, so a run whose input another member finished
publishes nothing. Each output's event id is derived from its input's event id
(or entry id) and its position (``uuid5`` of ``<input id>/<index>``): a duplicate
of the input gets outputs with the same ids, which consumers downstream can
recognise (``docs/guarantees.md``, "Chaining").

To a live or local target there is no such script: publish, then ack (at least
once; a crash in between publishes again, with new event ids).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Final

from .._envelope import Envelope
from .._keys import TopicKeys
from .._scripts import ACK_PUBLISH
from .._stats import ConsumerCounters
from .._topic import Topic
from ._dedupe import Dedupe
from ._entry import Work

__all__ = ["Chainer"]

_CHAIN_NAMESPACE: Final = uuid.UUID("6f1c5f7e-8a1b-4d0e-9a57-2f4b3c9e0d11")


class Chainer:
    """Publishes one group member's handler results to ``target`` (see the module doc).

    ``target_keys``: the target's keys if it is durable, else ``None``.
    ``ack(entry_id, event_id)``: the member's ack, for a live or local target.
    ``forget(entry_id)``: the member stops holding the entry (after the script).
    """

    def __init__(
        self,
        *,
        client: Any,
        keys: TopicKeys,
        group: str,
        target: Topic[Any],
        target_keys: TopicKeys | None,
        encode_output: Callable[[Topic[Any], Any, str, Envelope], list[bytes]],
        publish_output: Callable[[Topic[Any], Any], Awaitable[object]],
        note_output: Callable[[Topic[Any], int], None],
        dedupe: Dedupe | None,
        counters: ConsumerCounters,
        ack: Callable[[str, str | None], None],
        forget: Callable[[str], None],
    ) -> None:
        self._script = client.register_script(ACK_PUBLISH)
        self._keys = keys
        self._group = group
        self._target = target
        self._target_keys = target_keys
        self._encode_output = encode_output
        self._publish_output = publish_output
        self._note_output = note_output
        self._dedupe = dedupe
        self._counters = counters
        self._ack = ack
        self._forget = forget

    async def chain(self, work: Work, env: Envelope, result: Any) -> None:
        """Publish ``result`` (one event, or a list or tuple of them) and ack ``work``."""
        target = self._target
        events = list(result) if isinstance(result, list | tuple) else [result]
        if self._target_keys is None:
            # A live or local target: publish, then ack (at least once).
            for event in events:
                await self._publish_output(target, event)
            self._ack(work.id, env.id)
            return
        args: list[Any] = [self._group, work.id, ""]
        if target.trim == "hard" and target.maxlen is not None:
            args[2] = target.maxlen
        parent = env.id or work.id
        for index, event in enumerate(events):
            child_id = uuid.uuid5(_CHAIN_NAMESPACE, f"{parent}/{index}").hex
            fields = self._encode_output(target, event, child_id, env)
            args += [len(fields), *fields]
        ids = await self._script(keys=[self._keys.stream, self._target_keys.stream], args=args)
        self._forget(work.id)
        if ids is None:
            self._counters.ack_lost_ownership += 1
        else:
            self._counters.acked += 1
            self._note_output(target, len(ids))
            if self._dedupe is not None and env.id:
                await self._dedupe.mark(env.id)

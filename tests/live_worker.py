"""A live-topic subscriber process for F11: ``python -m tests.live_worker ...``.

Run as a real subprocess so that SIGSTOP really stalls it (its reader, its event
loop, its timers). It subscribes to one live topic and records the ``seq`` of
every event it receives, the gaps reported, and the push connection's losses.

Messages are dicts: ``{"kind": "data"}`` is counted; ``{"kind": "sync", "token": k}``
is counted and echoed on stdout (the test knows the subscriber caught up);
``{"kind": "fence"}`` is counted and ends the run with a report.

stdout carries one JSON object per line: ``ready`` (with the push connection's
``CLIENT ID``), ``sync``, ``disconnected`` (``t``, ``reason``), ``reconnected``
(``t``), and ``report`` (counts, gaps, statistics), then ``exit``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import anyio
import orjson

from eventbus import EventBus, Gap, LivePolicy, signals


def emit(record: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(record).decode() + "\n")
    sys.stdout.flush()


async def main(args: argparse.Namespace) -> int:
    live = LivePolicy(
        ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
        reconnect_backoff=0.05,
        connect_timeout=2.0,
    )
    bus = EventBus(args.url, prefix=args.prefix, live=live, client_name="live-worker")
    gaps: list[Gap] = []
    bus.connect_signal(
        signals.disconnected,
        lambda s, **kw: emit({"event": "disconnected", "t": time.time(), "reason": kw["reason"]}),
    )
    bus.connect_signal(
        signals.reconnected,
        lambda s, **kw: emit(
            {"event": "reconnected", "t": time.time(), "push_client_id": bus.push_client_id}
        ),
    )
    bus.connect_signal(signals.gap, lambda s, **kw: gaps.append(kw["gap"]))
    seqs: list[int] = []
    publishers: set[str] = set()
    with anyio.move_on_after(args.max_seconds):
        async with bus, bus.subscribe(args.topic, buffer=args.buffer) as sub:
            emit({"event": "ready", "t": time.time(), "push_client_id": bus.push_client_id})
            async for event, delivery in sub.deliveries():
                seqs.append(delivery.seq)
                publishers.add(delivery.publisher)
                kind = event.get("kind")
                if kind == "sync":
                    emit({"event": "sync", "token": event["token"]})
                elif kind == "fence":
                    stats = sub.statistics()
                    emit(
                        {
                            "event": "report",
                            "received": len(seqs),
                            "ordered": seqs == sorted(set(seqs)),
                            "last_seq": seqs[-1],
                            "publishers": len(publishers),
                            "gaps": [[g.first_missing, g.last_missing, g.size] for g in gaps],
                            "stats": {
                                "gaps": stats.gaps,
                                "missed": stats.missed,
                                "reconnects": stats.reconnects,
                                "dropped": stats.dropped,
                                "received": stats.received,
                            },
                            "bus_reconnects": bus.reconnects,
                            "disconnects": bus.disconnects,
                        }
                    )
                    break
    emit({"event": "exit", "t": time.time()})
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m tests.live_worker")
    p.add_argument("--url", required=True)
    p.add_argument("--prefix", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--buffer", type=int, default=20_000)
    p.add_argument("--ping-interval", type=float, default=1.0)
    p.add_argument("--ping-timeout", type=float, default=1.0)
    p.add_argument("--max-seconds", type=float, default=60.0)
    return p.parse_args(argv)


if __name__ == "__main__":
    sys.exit(anyio.run(main, parse_args(), backend="asyncio"))

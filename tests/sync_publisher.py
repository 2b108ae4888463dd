"""A plain blocking program for tests/test_sync.py: no event loop of its own.

``python -m tests.sync_publisher URL PREFIX THREADS PER_THREAD`` publishes
``THREADS x PER_THREAD`` events from that many threads through one
:class:`eventbus.sync.SyncBus`, then ten with ``publish_many`` and two with ``delay=``
from the main thread, and prints one JSON object: every receipt's event id, and the
names of the threads still alive before exit. It does not close the bus: ``atexit``
does.
"""

from __future__ import annotations

import sys
import threading

import orjson

from eventbus import Topic
from eventbus.sync import SyncBus

orders: Topic[dict[str, int]] = Topic("orders", dict[str, int], durable=True)


def main() -> None:
    url, prefix, threads, per = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    bus = SyncBus(url, prefix=prefix)
    ids: list[str] = []
    lock = threading.Lock()
    errors: list[str] = []

    def work(t: int) -> None:
        try:
            for i in range(per):
                receipt = bus.publish(orders, {"t": t, "i": i})
                with lock:
                    ids.append(receipt.id)
        except Exception as exc:  # reported, so the test sees it
            errors.append(repr(exc))

    workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(60)
    ids += [r.id for r in bus.publish_many(orders, [{"t": -1, "i": i} for i in range(10)])]
    ids += [bus.publish(orders, {"t": -2, "i": i}, delay=0.2).id for i in range(2)]
    sys.stdout.write(orjson.dumps({"ids": ids, "errors": errors}).decode() + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""RELIABILITY.md F11: Redis disconnects a slow pub/sub reader (output buffer limit).

The subscriber is a real process (``tests.live_worker``), stopped with SIGSTOP
while ~5 MB are published to its topic. Redis, with ``client-output-buffer-limit
pubsub 256kb 128kb 1``, closes its connection. After SIGCONT the subscriber must
notice within 1 s, resubscribe, report the loss as gaps that add up exactly to
what it did not receive (as in F10), and count the disconnect under the reason
it can infer, ``output_buffer``.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import anyio
import orjson
import pytest

from eventbus import EventBus

from .helpers import control_client, wait_until

pytestmark = [pytest.mark.fault]

ROOT = Path(__file__).resolve().parents[1]
PAD = "x" * 1000  # ~1.1 KB per message on the wire


class Subscriber:
    """The ``tests.live_worker`` process and the JSON lines it printed."""

    def __init__(self, argv: list[str], stderr: Path) -> None:
        self.events: list[dict[str, Any]] = []
        self._stderr_path = stderr
        self._stderr = stderr.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.live_worker", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            self.events.append(orjson.loads(raw))

    def find(self, name: str, **match: Any) -> dict[str, Any] | None:
        for e in self.events:
            if e["event"] == name and all(e.get(k) == v for k, v in match.items()):
                return e
        return None

    async def wait_for(self, name: str, timeout: float, **match: Any) -> dict[str, Any]:
        def seen() -> bool:
            if self.proc.poll() is not None and self.find(name, **match) is None:
                raise AssertionError(
                    f"subscriber exited before {name!r}:\n"
                    + self._stderr_path.read_text(errors="replace")[-3000:]
                )
            return self.find(name, **match) is not None

        await wait_until(seen, timeout=timeout)
        found = self.find(name, **match)
        assert found is not None
        return found

    def close(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.proc.pid, signal.SIGCONT)
            self.proc.kill()
        self.proc.wait()
        self._reader.join(5)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


async def test_f11_output_buffer_disconnect_is_detected_resubscribed_and_accounted(
    redis_server_factory: Any, tmp_path: Path
) -> None:
    server = redis_server_factory()
    topic = "f11"
    sub = Subscriber(
        ["--url", server.url, "--prefix", "f11", "--topic", topic], tmp_path / "sub.stderr"
    )
    published = 0
    try:
        async with control_client(server.url) as ctl, EventBus(server.url, prefix="f11") as pub:
            await ctl.config_set("client-output-buffer-limit", "pubsub 256kb 128kb 1")
            ready = await sub.wait_for("ready", timeout=20)
            old_id = ready["push_client_id"]

            async def publish(events: list[dict[str, Any]]) -> None:
                nonlocal published
                await pub.publish_many(topic, events)
                published += len(events)

            await publish([{"kind": "data", "pad": PAD} for _ in range(100)])
            await publish([{"kind": "sync", "token": 1}])
            await sub.wait_for("sync", timeout=5, token=1)  # caught up: nothing buffered

            os.kill(sub.proc.pid, signal.SIGSTOP)
            stopped_at = time.monotonic()
            sent_bytes = 0
            for _ in range(10):  # 5,000 x ~1.1 KB
                await publish([{"kind": "data", "pad": PAD} for _ in range(500)])
                sent_bytes += 500 * (len(PAD) + 100)

            async def old_client_gone() -> bool:
                return all(int(c["id"]) != old_id for c in await ctl.client_list())

            closed_s = await wait_until(old_client_gone, timeout=5)
            # The stall lasts 3 s in all (the fault's length, not an ordering wait).
            await anyio.sleep_until(anyio.current_time() + 3 - (time.monotonic() - stopped_at))
            cont_at = time.time()
            os.kill(sub.proc.pid, signal.SIGCONT)

            lost = await sub.wait_for("disconnected", timeout=5)
            back = await sub.wait_for("reconnected", timeout=5)
            detection = lost["t"] - cont_at
            resubscribed = back["t"] - cont_at
            numsub = dict(await ctl.pubsub_numsub(f"f11:{{{topic}}}"))
            await publish([{"kind": "data", "pad": PAD} for _ in range(100)])
            await publish([{"kind": "fence"}])
            report = await sub.wait_for("report", timeout=10)
            await sub.wait_for("exit", timeout=10)
    finally:
        sub.close()

    gaps = report["gaps"]
    missed = sum(size for _first, _last, size in gaps)
    print(
        f"F11: published={published} (~{sent_bytes // 1_000_000} MB while stopped)"
        f" received={report['received']} gaps={len(gaps)} missed={missed}"
        f" closed_s={closed_s:.2f} (after the publishes) detection_s={detection:.3f}"
        f" resubscribed_s={resubscribed:.3f} disconnects={report['disconnects']}"
        f" reason={lost['reason']}"
    )
    assert detection <= 1.0, detection
    assert resubscribed <= 1.0, resubscribed
    assert back["push_client_id"] != old_id
    assert numsub == {f"f11:{{{topic}}}": 1}
    # Exact accounting, as in F10: every message is received or inside a reported gap.
    assert report["ordered"]
    assert report["publishers"] == 1
    assert report["last_seq"] == published
    assert missed == published - report["received"]
    assert missed > 0
    assert report["stats"]["missed"] == missed
    assert report["stats"]["gaps"] == len(gaps)
    assert report["stats"]["dropped"] == 0
    assert report["stats"]["reconnects"] == report["bus_reconnects"] == 1
    assert lost["reason"] == "output_buffer"
    assert report["disconnects"] == {"output_buffer": 1}

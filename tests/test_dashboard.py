"""``eventbus dashboard``, looked at as a person and a tool would: the command runs
as a subprocess against the session's private redis-server while this process
publishes to a durable topic that a consumer group reads; a headless Chromium
(Debian's ``chromium`` and ``chromedriver``, driven by selenium) loads the page,
and plain HTTP reads the JSON endpoints.

Without a browser the browser test is skipped, except where one is required
(``$CI`` or ``$EVENTBUS_REQUIRE_BROWSER`` set, as ``.ci/run`` does after
installing it): there it fails.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest

from eventbus import EventBus, Topic
from tests.helpers import wait_until
from tests.test_cli import COMMAND, _env

pytestmark = pytest.mark.timeout(60)

START_TIMEOUT = 20.0


def _require_browser() -> bool:
    return bool(os.environ.get("CI") or os.environ.get("EVENTBUS_REQUIRE_BROWSER"))


def _browser_paths() -> tuple[str, str]:
    """Debian's chromium and chromedriver; skip (or, where required, fail) without."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    try:
        import selenium  # noqa: F401
    except ImportError:
        driver = None
    if chromium and driver:
        return chromium, driver
    reason = (
        "no headless browser: needs chromium, chromedriver (apt-get install chromium"
        " chromium-driver) and selenium (the test extra)"
    )
    if _require_browser():
        pytest.fail(reason + "; required here ($CI / $EVENTBUS_REQUIRE_BROWSER)")
    pytest.skip(reason)


class Dashboard:
    """A running ``eventbus dashboard`` subprocess and the URL it printed."""

    def __init__(self, proc: subprocess.Popen[str], url: str, prefix: str) -> None:
        self.proc = proc
        self.url = url
        self.prefix = prefix
        host, port = re.fullmatch(r"http://([^/:]+):(\d+)/", url).groups()  # type: ignore[union-attr]
        self.host = host
        self.port = int(port)

    def get(self, path: str, *, method: str = "GET", host: str | None = None) -> tuple[int, Any]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=10)
        try:
            headers = {"Host": host} if host is not None else {}
            conn.request(method, path, headers=headers)
            reply = conn.getresponse()
            body = reply.read()
        finally:
            conn.close()
        kind = reply.getheader("content-type") or ""
        return reply.status, (json.loads(body) if kind.startswith("application/json") else body)

    def stop(self) -> tuple[int, str]:
        """SIGTERM; the exit status and stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            _, err = self.proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate(timeout=5)
        return self.proc.returncode, err


@pytest.fixture
def dashboard(redis_url: str) -> Iterator[Dashboard]:
    prefix = f"d{uuid.uuid4().hex[:8]}"
    proc = subprocess.Popen(
        [*COMMAND, "dashboard", "--port", "0", "--interval", "0.5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(EVENTBUS_URL=redis_url, EVENTBUS_PREFIX=prefix),
    )
    assert proc.stdout is not None
    line = ""
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        deadline = time.monotonic() + START_TIMEOUT
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if sel.select(timeout=0.2):
                line = proc.stdout.readline()
    if not line:
        proc.kill()
        _, err = proc.communicate(timeout=5)
        pytest.fail(f"the dashboard printed no URL within {START_TIMEOUT} s: {err}")
    match = re.search(r"http://\S+/", line)
    assert match is not None, line
    assert match[0].startswith("http://127.0.0.1:"), line  # loopback unless asked
    board = Dashboard(proc, match[0], prefix)
    try:
        yield board
    finally:
        board.stop()


@asynccontextmanager
async def traffic(redis_url: str, prefix: str, topic: str) -> AsyncIterator[dict[str, int]]:
    """Publish to the durable ``topic`` every 20 ms (at most 2000 events) while a
    consumer group ``billing`` reads it, for as long as the block runs."""
    orders: Topic[Any] = Topic(topic, durable=True)
    bus = EventBus(redis_url, prefix=prefix)
    counts = {"published": 0, "handled": 0}

    @bus.on(orders, group="billing")
    async def bill(event: Any) -> None:
        counts["handled"] += 1

    async with bus, anyio.create_task_group() as tg:

        async def publish() -> None:
            for i in range(2000):
                await bus.publish(orders, {"order": i})
                counts["published"] += 1
                await anyio.sleep(0.02)

        tg.start_soon(publish)
        yield counts
        tg.cancel_scope.cancel()


def _chart_path(driver: Any, chart: str, series: str) -> tuple[str, int] | None:
    found = driver.execute_script(
        "const p = Array.from(document.querySelectorAll('#' + arguments[0] + ' path'))"
        ".find((e) => e.dataset.series === arguments[1]);"
        "return p ? [p.getAttribute('d'), Number(p.dataset.points)] : null;",
        chart,
        series,
    )
    return None if found is None else (str(found[0]), int(found[1]))


def _look_in_browser(
    url: str, topic: str, chromium: str, driver_path: str, profile: Path
) -> dict[str, Any]:
    """Load the page headless and read it as a person would; what was seen."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for arg in (
        "--headless=new",
        "--no-sandbox",  # root in CI containers
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-extensions",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1400,1600",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.set_page_load_timeout(20)
        driver.get(url)
        wait = WebDriverWait(driver, 15, poll_frequency=0.1)
        wait.until(lambda d: topic in d.find_element(By.ID, "topics").text)
        wait.until(lambda d: "billing" in d.find_element(By.ID, "groups").text)
        # The publish-rate chart draws the topic once it has two points...
        first = wait.until(
            lambda d: (p := _chart_path(d, "chart-publish", topic)) is not None and p[1] >= 2 and p
        )
        # ...and moves while publishing goes on: more points, another path.
        later = wait.until(
            lambda d: (
                (p := _chart_path(d, "chart-publish", topic)) is not None
                and p[1] > first[1]
                and p[0] != first[0]
                and p
            )
        )
        return {
            "first": first,
            "later": later,
            "topics_table": driver.find_element(By.ID, "topics").text,
            "legend": driver.find_element(By.ID, "legend-publish").text,
            "status": driver.find_element(By.ID, "status").text,
            "title": driver.title,
            "log": driver.get_log("browser"),
        }
    finally:
        driver.quit()


async def test_page_in_a_headless_browser(
    dashboard: Dashboard, redis_url: str, tmp_path: Path
) -> None:
    chromium, driver_path = _browser_paths()
    topic = "orders"
    async with traffic(redis_url, dashboard.prefix, topic) as counts:
        await wait_until(lambda: counts["handled"] >= 5, timeout=10)
        seen = await anyio.to_thread.run_sync(
            _look_in_browser, dashboard.url, topic, chromium, driver_path, tmp_path / "profile"
        )
    severe = [entry for entry in seen["log"] if entry.get("level") == "SEVERE"]
    assert severe == [], severe  # no console errors, no failed loads
    assert seen["title"] == "eventbus dashboard"
    assert topic in seen["topics_table"]
    assert topic in seen["legend"]
    assert seen["status"].startswith("live"), seen["status"]
    # The rate drawn is not flat zero: some point sits above the chart's zero line.
    ys = [float(y) for y in re.findall(r"[ML][\d.]+ ([\d.]+)", seen["later"][0])]
    assert ys, seen["later"]
    assert min(ys) < max(ys) or min(ys) < 176.0, seen["later"]  # 176: the zero line
    status, err = dashboard.stop()
    assert status == 128 + signal.SIGTERM, err
    assert "Traceback" not in err


async def test_json_endpoints(dashboard: Dashboard, redis_url: str) -> None:
    async with traffic(redis_url, dashboard.prefix, "orders") as counts:
        await wait_until(lambda: counts["handled"] >= 20, timeout=10)

        def both_rates_seen() -> bool:
            status, snap = dashboard.get("/api/snapshot")
            assert status == 200
            topics = {t["name"]: t for t in snap["topics"]}
            if "orders" not in topics:
                return False
            t = topics["orders"]
            return bool(t["publish_rate"]) and any(
                g["name"] == "billing" and g["consumers"] >= 1 for g in t["groups"]
            )

        for _ in range(100):  # bounded: 100 looks, 0.1 s apart
            if await anyio.to_thread.run_sync(both_rates_seen):
                break
            await anyio.sleep(0.1)
        else:
            pytest.fail("/api/snapshot never showed orders with a publish rate and its group")

    status, snap = await anyio.to_thread.run_sync(dashboard.get, "/api/snapshot")
    assert status == 200
    assert snap["prefix"] == dashboard.prefix
    assert snap["sampler"]["interval"] == 0.5
    assert snap["sampler"]["error"] is None
    (orders,) = (t for t in snap["topics"] if t["name"] == "orders")
    assert orders["length"] >= 20
    assert orders["dead_letters"] == 0
    (billing,) = orders["groups"]
    assert billing["name"] == "billing"
    assert {"pending", "lag", "oldest_pending_age", "consume_rate"} <= billing.keys()
    assert {"queues", "delayed", "schedules", "at"} <= snap.keys()

    status, history = await anyio.to_thread.run_sync(dashboard.get, "/api/history")
    assert status == 200
    points = history["points"]
    assert len(points) >= 2
    times = [p["at"] for p in points]
    assert times == sorted(times)
    assert any((p["topics"].get("orders") or {}).get("rate") for p in points)
    assert "orders/billing" in points[-1]["groups"]
    status, later = await anyio.to_thread.run_sync(dashboard.get, f"/api/history?after={times[-2]}")
    assert status == 200
    assert [p["at"] for p in later["points"]][:1] == [times[-1]]

    # Read-only, loopback names only, and a bad query is a 400 with a reason.
    status, _ = await anyio.to_thread.run_sync(
        lambda: dashboard.get("/api/snapshot", method="POST")
    )
    assert status == 405
    status, body = await anyio.to_thread.run_sync(
        lambda: dashboard.get("/api/snapshot", host="attacker.example")
    )
    assert status == 400, body
    status, body = await anyio.to_thread.run_sync(
        lambda: dashboard.get("/api/snapshot", host=f"localhost:{dashboard.port}")
    )
    assert status == 200
    status, body = await anyio.to_thread.run_sync(dashboard.get, "/api/history?after=soon")
    assert status == 400
    assert "after" in body["error"]

    # The page and its files are served from the package (no CDN).
    status, page = await anyio.to_thread.run_sync(dashboard.get, "/")
    assert status == 200
    assert b"static/dashboard.js" in page
    assert re.search(rb'(src|href)="(https?:)?//', page) is None  # nothing from elsewhere
    for name in ("dashboard.js", "dashboard.css", "favicon.svg"):
        status, _ = await anyio.to_thread.run_sync(dashboard.get, f"/static/{name}")
        assert status == 200, name

    status, err = dashboard.stop()
    assert status == 128 + signal.SIGTERM, err
    assert "Traceback" not in err


def test_redis_unreachable_fails_before_serving(redis_url: str) -> None:
    from eventbus.testing import free_port

    out = subprocess.run(
        [*COMMAND, "dashboard", "--port", "0", "--url", f"redis://127.0.0.1:{free_port()}/0"],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
        check=False,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "Traceback" not in out.stderr
    assert "http://" not in out.stdout  # never served


def test_without_the_extra_it_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['starlette'] = None\n"  # as if not installed
        "from eventbus._cli import main\n"
        "main(['dashboard', '--port', '0'])\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=30,
        env=_env(),
        check=False,
    )
    assert out.returncode == 1, (out.stdout, out.stderr)
    assert "pip install 'eventbus[dashboard]'" in out.stderr
    assert "Traceback" not in out.stderr


def test_is_loopback() -> None:
    from eventbus._cli._dashboard import is_loopback

    assert is_loopback("127.0.0.1")
    assert is_loopback("localhost")
    assert is_loopback("::1")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.10")
    assert not is_loopback("example.com")

"""The docs run as written: every python block of README.md and of the docs site's pages,
and the tutorial's two services under ``python -m eventbus run``.

Each python block runs in its own subprocess with ``EVENTBUS_URL`` unset, so a block
that opens a bus must start the embedded server (``EventBus.embedded()``) or say where
its Redis is from ``$EVENTBUS_URL``. A block preceded by ``<!-- not run: reason -->``
is shown but not run (it serves forever, or needs a framework); one preceded by
``<!-- requires: module -->`` runs only where that module is installed. A block that
includes a file (``--8<-- "examples/..."``) shows a file tested on its own (the
tutorial's, below).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
TUTORIAL = ROOT / "examples" / "tutorial"

# Pages whose blocks are not checked here: written before the docs site, they quote
# fragments (a lifespan, an ACL rule) that their own tests cover. cli.md comes from the
# CLI's branch with its own tests.
UNCHECKED = {"architecture.md", "guarantees.md", "wire-format.md", "cli.md"}

_FENCE = re.compile(r"^(?P<indent>[ ]*)```(?P<lang>[\w+-]*)\s*$")
_MARK = re.compile(r"<!--\s*(?P<kind>not run|requires)\s*:\s*(?P<arg>.*?)\s*-->")
BLOCK_TIMEOUT = 30.0


class Block(NamedTuple):
    path: Path
    line: int
    code: str
    mark: tuple[str, str] | None

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def python_blocks(path: Path) -> Iterator[Block]:
    """The ```python blocks of a markdown file, with the marker comment before each."""
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = _FENCE.match(lines[i])
        if not fence or not fence["lang"]:
            i += 1
            continue
        indent, lang, start = fence["indent"], fence["lang"], i
        body: list[str] = []
        i += 1
        while i < len(lines) and lines[i].strip() != "```":
            body.append(lines[i][len(indent) :] if lines[i].startswith(indent) else lines[i])
            i += 1
        i += 1
        if lang not in ("python", "py"):
            continue
        before = start - 1
        while before >= 0 and not lines[before].strip():
            before -= 1
        mark = _MARK.search(lines[before]) if before >= 0 else None
        yield Block(
            path, start + 1, "\n".join(body) + "\n", (mark["kind"], mark["arg"]) if mark else None
        )


def checked_pages() -> list[Path]:
    pages = [ROOT / "README.md"]
    pages += sorted(p for p in DOCS.rglob("*.md") if p.name not in UNCHECKED)
    return pages


ALL_BLOCKS = [block for page in checked_pages() for block in python_blocks(page)]


def _snippet(block: Block) -> bool:
    return block.code.lstrip().startswith("--8<--")


def test_blocks_found() -> None:
    """The extraction sees the pages' blocks (a broken fence parser would pass vacuously)."""
    pages = {block.path.name for block in ALL_BLOCKS}
    assert {"README.md", "index.md", "concepts.md", "testing.md"} <= pages, pages
    runnable = [b for b in ALL_BLOCKS if b.mark is None and not _snippet(b)]
    assert len(runnable) >= 20, len(runnable)
    not_run = [b.id for b in ALL_BLOCKS if b.mark and b.mark[0] == "not run"]
    assert len(not_run) <= 12, not_run  # keep them few


@pytest.mark.parametrize("block", ALL_BLOCKS, ids=[b.id for b in ALL_BLOCKS])
def test_block_runs(block: Block, tmp_path: Path) -> None:
    if _snippet(block):
        included = block.code.split('"')[1]
        assert (ROOT / included).is_file(), f"{block.id} includes a missing file {included}"
        return
    if block.mark is not None:
        kind, arg = block.mark
        if kind == "not run":
            assert arg, f"{block.id}: say why a block is not run"
            compile(block.code, block.id, "exec")  # still valid Python
            return
        pytest.importorskip(arg)
    # On the embedded server or $EVENTBUS_URL, never a hard-coded Redis.
    for address in ("localhost", "127.0.0.1", ":6379"):
        assert address not in block.code, f"{block.id} hard-codes {address}"
    script = tmp_path / "block.py"
    script.write_text(block.code)
    env = {k: v for k, v in os.environ.items() if k not in ("EVENTBUS_URL", "EVENTBUS_SLOT")}
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )
    assert proc.returncode == 0, f"{block.id} failed:\n{block.code}\n{proc.stdout}{proc.stderr}"


# -- the tutorial: two services under the runner ------------------------------------------


class _Service:
    def __init__(self, target: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        self._out = log.open("wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eventbus", "run", target],
            cwd=TUTORIAL,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._out.close()


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def test_tutorial_services(tmp_path: Path, redis_server_factory: Any) -> None:
    """docs/tutorial.md as a reader runs it: billing and mailer under the runner on one
    Redis, orders placed by the script, every invoice mailed once; SIGTERM, exit 0,
    nothing left pending."""
    server = redis_server_factory()
    env = {k: v for k, v in os.environ.items() if k != "EVENTBUS_SLOT"}
    env["EVENTBUS_URL"] = server.url
    count = 5
    services = [
        _Service("shop.billing:bus", env, tmp_path / "billing.log"),
        _Service("shop.mailer:bus", env, tmp_path / "mailer.log"),
    ]
    try:
        for svc in services:
            _wait(lambda svc=svc: "serving" in svc.text(), 30, f"{svc.log.name}: serving")
        placed = subprocess.run(
            [sys.executable, "place_orders.py", str(count)],
            cwd=TUTORIAL,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert placed.returncode == 0, placed.stdout + placed.stderr
        assert placed.stdout.count("placed o-") == count, placed.stdout
        billing, mailer = services
        _wait(
            lambda: mailer.text().count("mailed invoice for") >= count, 30, "every invoice mailed"
        )
        for n in range(1, count + 1):
            assert f"billing order o-{n} (attempt 1)" in billing.text()
            assert mailer.text().count(f"mailed invoice for o-{n}:") == 1, mailer.text()
        codes = [svc.stop(timeout=30) for svc in services]
        assert codes == [0, 0], [svc.text() for svc in services]
        for svc in services:
            assert "Traceback" not in svc.text(), svc.text()
    finally:
        for svc in services:
            svc.kill()
    client = redis.Redis.from_url(server.url, decode_responses=True)
    try:
        for stream, group in (
            ("eb:{orders}:stream", "billing"),
            ("eb:{invoices}:stream", "mailer"),
        ):
            assert client.xpending(stream, group)["pending"] == 0
    finally:
        client.close()

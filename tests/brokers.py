"""Test helpers shared by the MQTT and daemon tests: a free loopback port, and a real
mosquitto on 127.0.0.1 that a test starts, stops (SIGTERM: it saves what it persists) and
starts again on the same port."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Mosquitto:
    """A mosquitto on 127.0.0.1 and a port of its own.

    ``conf``: a whole config (``{port}`` is filled in); default: anonymous, persistent when
    ``persistent`` (sessions and retained messages survive a restart). ``extra`` lines are
    added to it.
    """

    def __init__(
        self,
        tmp: Path,
        extra: str = "",
        conf: str | None = None,
        name: str = "broker",
        persistent: bool = False,
    ) -> None:
        if shutil.which("mosquitto") is None:
            if os.environ.get("CI"):
                pytest.fail("mosquitto is not installed (.ci/run installs it)")
            pytest.skip("mosquitto is not installed (apt-get install mosquitto)")
        self.port = free_port()
        self.folder = tmp / f"{name}-{self.port}"
        self.folder.mkdir(exist_ok=True)
        if conf is None:
            conf = "listener {port} 127.0.0.1\nallow_anonymous true\n" + (
                f"persistence true\npersistence_location {self.folder}/\n"
                "max_queued_messages 100000\n"
                if persistent
                else "persistence false\n"
            )
        # as root, mosquitto drops to its own user, which cannot read pytest's tmp folders
        user = "user root\n" if os.geteuid() == 0 else ""
        self.conf = self.folder / "mosquitto.conf"
        self.conf.write_text(conf.replace("{port}", str(self.port)) + extra + user)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port)):
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise RuntimeError(f"mosquitto did not start: {self.proc.stderr.read()}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=10)

    def pub(self, topic: str, message: bytes, qos: int = 1) -> None:
        """Publish one message as an outside client (mosquitto_pub)."""
        subprocess.run(
            ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-t", topic]
            + ["-q", str(qos), "-s"],
            input=message,
            check=True,
            timeout=10,
        )

    def retained(self, topic: str = "crossl/status", *login: str) -> dict | None:
        """The retained message on ``topic`` (JSON), None when there is none."""
        auth = ["-u", login[0], "-P", login[1]] if login else []
        out = subprocess.run(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.port), *auth, "-t", topic]
            + ["-C", "1", "-W", "1", "--retained-only"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        return json.loads(out.stdout) if out.stdout.strip() else None

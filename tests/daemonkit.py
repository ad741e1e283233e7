"""A real `backupwatchd` process on a tmp tree, observed through sd_notify, files and the ctl."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

BIN = Path(sys.executable).parent


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll until `predicate` returns something truthy, failing with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


class NotifySocket:
    """The systemd side of sd_notify: a datagram socket the daemon reports to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def expect(self, needle: str, timeout: float = 20.0) -> str:
        """Return the first datagram (old or new) containing `needle`."""
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if needle in message:
                    self.messages.remove(message)
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no sd_notify message with {needle!r}; got {self.messages}")
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                continue

    def collect(self, seconds: float) -> list[str]:
        """Everything that arrives within `seconds`: for asserting that something did not."""
        deadline = time.monotonic() + seconds
        while (remaining := deadline - time.monotonic()) > 0:
            self.sock.settimeout(remaining)
            try:
                self.messages.append(self.sock.recv(65536).decode())
            except TimeoutError:
                break
        collected, self.messages = self.messages, []
        return collected

    def close(self) -> None:
        self.sock.close()


@dataclass
class Daemon:
    base: Path
    config: Path
    run_dir: Path
    env: dict[str, str]
    process: subprocess.Popen[bytes] | None = None
    notify: NotifySocket | None = None
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log_path = self.base / "daemon.log"

    @property
    def deposit(self) -> Path:
        return self.base / "deposit"

    @property
    def validated(self) -> Path:
        return self.base / "validated"

    def start(
        self, wait_ready: bool = True, as_user: list[str] | None = None, notify: bool = True
    ) -> None:
        """Start backupwatchd; `as_user` is a command prefix such as setpriv's; without
        `notify`, the daemon keeps whatever NOTIFY_SOCKET `env` holds."""
        env = dict(self.env)
        if notify:
            self.notify = NotifySocket(self.run_dir / f"notify-{time.monotonic_ns()}.sock")
            os.chmod(self.notify.path, 0o666)
            env["NOTIFY_SOCKET"] = str(self.notify.path)
        command = [str(BIN / "backupwatchd"), "--config", str(self.config), "--log-target", "json"]
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                [*(as_user or []), *command],
                env=env,
                stdout=log,
                stderr=log,
            )
        if wait_ready:
            assert self.notify is not None
            self.notify.expect("READY=1")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        assert self.process is not None
        self.process.send_signal(sig)
        code = self.process.wait(timeout)
        if self.notify:
            self.notify.close()
            self.notify = None
        return code

    def ctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "backupwatchctl"), "--config", str(self.config), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def ctl_json(self, *args: str) -> Any:
        result = self.ctl(*args, "--json")
        assert result.returncode in (0, 3), result.stderr
        return json.loads(result.stdout)

    def history(self, job: str) -> list[dict[str, Any]]:
        result = self.ctl("history", job, "--json")
        return json.loads(result.stdout) if result.returncode == 0 else []

    def logs(self) -> list[dict[str, Any]]:
        lines = self.log_path.read_text().splitlines()
        return [json.loads(line) for line in lines if line.startswith("{")]

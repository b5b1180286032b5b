"""`orchestrator run` as a real child process: config, log, URL, signals, exit status."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

import pytest
from loguru import logger

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

PY = sys.executable
#: CI must run every test: a missing tool there is a failure, not a skip.
CI = bool(os.environ.get("CI"))


def need_tool(name: str, why: str) -> str:
    """The path of ``name``; skip (locally) or fail (in CI, ``CI`` set) when it is missing."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed ({why}); .ci/run installs it"
        if CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def service_config(body: str = "", *, listen: str = "127.0.0.1:0", interval: float = 0.3) -> str:
    """A service config: one directory source ``in`` → stage ``work`` (``extra`` appended)."""
    listen_toml = "false" if listen == "false" else f'"{listen}"'
    return textwrap.dedent(f"""
        state_dir = "state"
        shutdown_grace = "5s"
        [http]
        listen = {listen_toml}
        [status]
        interval = {interval}
        [log]
        level = "INFO"
        """) + textwrap.dedent(body)


DEFAULT_PIPELINE = f"""
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    settle = "0s"
    poll_interval = "0.1s"
    route = ["work"]
    [[stages]]
    name = "work"
    command = ["{PY}", "-c", "import sys, time; time.sleep(float(open(sys.argv[1]).read() or 0))", "{{path}}"]
    concurrency = 2
    timeout = "30s"
    """


class Service:
    """One ``orchestrator run`` child; its stderr goes to ``log`` (a file: it never blocks)."""

    def __init__(self, folder: Path, config: str, *, env: dict[str, str] | None = None) -> None:
        self.folder = folder
        (folder / "in").mkdir(exist_ok=True)
        self.config_path = folder / "orchestrator.toml"
        self.config_path.write_text(config)
        self.log_path = folder / "service.log"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}  # fmt: skip
        self.env.update({"PYTHONUNBUFFERED": "1", **(env or {})})
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [PY, "-m", "orchestrator", "run", "-c", str(self.config_path)],
                cwd=folder, env=self.env, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        self.pid = self.proc.pid

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str, timeout: float = 15.0) -> re.Match[str]:
        """Wait until the log matches ``pattern`` (a regex); fail with the log if it does not."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.log)
            if match:
                return match
            if self.proc.poll() is not None or time.monotonic() > deadline:
                state = (
                    f"exited {self.proc.returncode}" if self.proc.poll() is not None else "timeout"
                )
                raise AssertionError(f"{state}; no {pattern!r} in the log:\n{self.log}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return self.wait_log(r"http: listening on (http://\S+)").group(1)

    def get(self, path: str) -> tuple[int, bytes, dict[str, str]]:
        return http_get(self.url + path)

    def signal(self, sig: int) -> None:
        os.kill(self.pid, sig)

    def wait(self, timeout: float = 15.0) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"still running after {timeout}s; log:\n{self.log}") from None

    def stop(self, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def status(self) -> dict[str, Any]:
        return json.loads((self.folder / "state" / "status.json").read_text())  # type: ignore[no-any-return]


def http_get(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    """GET ``url``: status, body and headers (an HTTP error status is returned, not raised)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


@contextlib.contextmanager
def captured_logs(level: str = "DEBUG") -> Iterator[list[str]]:
    """Every loguru line (message plus its bound context) logged inside the block."""
    lines: list[str] = []

    def sink(message: Any) -> None:
        record = message.record
        lines.append(f"{record['level'].name} {record['message']} {record['extra']}")

    handler = logger.add(sink, level=level, format="{message}")
    try:
        yield lines
    finally:
        logger.remove(handler)


async def wait_logged(lines: list[str], pattern: str, timeout: float = 10.0) -> re.Match[str]:
    """Wait (in trio) until a captured line matches ``pattern``."""
    import trio

    with trio.fail_after(timeout):
        while True:
            for line in lines:
                match = re.search(pattern, line)
                if match:
                    return match
            await trio.sleep(0.02)


async def aget(url: str, timeout: float = 5.0) -> tuple[int, bytes, dict[str, str]]:
    """`http_get` from a worker thread (never block the test's trio loop)."""
    import trio

    return await trio.to_thread.run_sync(lambda: http_get(url, timeout))

"""sd_notify: a fake NOTIFY_SOCKET (a unix datagram socket bound here) hears the real service."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from servicekit import DEFAULT_PIPELINE, Service, need_tool, service_config

from orchestrator.config import load_config
from orchestrator.durations import parse_duration
from orchestrator.supervisor import FINAL_STATUS_GRACE
from orchestrator.systemd import Notifier
from orchestrator.watchdog import FAULTHANDLER_MARGIN, shortest_watchdog_sec
from orchestrator.workers import RECORD_GRACE

if TYPE_CHECKING:
    from collections.abc import Iterator


@contextlib.contextmanager
def notify_socket(path: str) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        yield sock
    finally:
        sock.close()


def receive(sock: socket.socket, until: float) -> list[tuple[float, str]]:
    """Every notification until ``until`` (monotonic), with its arrival time."""
    got = []
    while (left := until - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        got.append((time.monotonic(), data.decode()))
    return got


def wait_for(sock: socket.socket, line: str, timeout: float) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            data = sock.recv(4096).decode()
        except TimeoutError:
            break
        got.append((time.monotonic(), data))
        if line in data.splitlines():
            return got
    raise AssertionError(f"no {line!r} within {timeout}s; got {[g for _, g in got]}")


def test_notifier_abstract_socket_and_watchdog_interval() -> None:
    # Given: a socket in the abstract namespace, as systemd may pass it ("@name").
    name = f"orch-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        # When
        notifier = Notifier.from_environ({"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "3000000"})
        assert notifier is not None
        try:
            assert notifier.notify("READY=1", "STATUS=hello")
            # Then: one datagram, the lines joined; pings at half the watchdog period.
            assert server.recv(100) == b"READY=1\nSTATUS=hello"
            assert notifier.watchdog_interval == 1.5
        finally:
            notifier.close()


def test_notifier_absent_or_for_another_process() -> None:
    assert Notifier.from_environ({}) is None
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        name = f"orch-test-pid-{os.getpid()}"
        server.bind("\0" + name)
        env = {"NOTIFY_SOCKET": "@" + name, "WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}
        notifier = Notifier.from_environ(env)
        assert notifier is not None
        try:
            assert notifier.watchdog_interval is None  # the watchdog is meant for pid 1
        finally:
            notifier.close()


def test_notifier_unreachable_socket_is_none(tmp_path: Path) -> None:
    assert Notifier.from_environ({"NOTIFY_SOCKET": str(tmp_path / "nobody")}) is None


def test_service_notifies_ready_watchdog_status_and_stopping(tmp_path: Path) -> None:
    # Given: a fake NOTIFY_SOCKET and a 0.4 s systemd watchdog (pings due every 0.2 s).
    path = str(tmp_path / "notify.sock")
    with notify_socket(path) as sock:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"}
        service = Service(tmp_path, service_config(DEFAULT_PIPELINE), env=env)
        try:
            # When: the service starts
            got = wait_for(sock, "READY=1", timeout=15)
            # Then: HTTP is up by the time READY=1 is told.
            assert service.get("/health")[0] == 200
            got += receive(sock, time.monotonic() + 1.2)
            pings = [t for t, data in got if "WATCHDOG=1" in data.splitlines()]
            assert len(pings) >= 4, got
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) < 0.4, gaps  # within systemd's period: it would not kill us
            statuses = [data for _, data in got if data.startswith("STATUS=")]
            assert any("queued" in s and "running" in s and "done" in s for s in statuses), got
            # A 0.4 s WatchdogSec is far too short for the default loop_stall_timeout (60 s):
            # told once, with what would do (session 17).
            assert service.log.count("systemd's watchdog (WatchdogSec=0.4s) can end") == 1
            assert "set WatchdogSec to more than 140s" in service.log

            # When: it is told to stop
            service.signal(signal.SIGTERM)
            got = wait_for(sock, "STOPPING=1", timeout=10)
            assert service.wait() == 0
        finally:
            service.stop()


def test_blocked_loop_stops_the_watchdog_pings(tmp_path: Path) -> None:
    # Given: a service whose loop a test hook blocks for 1.2 s once, 0.5 s after start.
    path = str(tmp_path / "notify.sock")
    with notify_socket(path) as sock:
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000",
               "ORCH_TEST_BLOCK_LOOP": "1.2@0.5"}  # fmt: skip
        config = service_config(DEFAULT_PIPELINE + """
            [watchdog]
            loop_stall_warn = "0.5s"
            loop_stall_timeout = "20s"
            """)  # fmt: skip
        service = Service(tmp_path, config, env=env)
        try:
            got = wait_for(sock, "READY=1", timeout=15)
            # When: the loop is blocked
            got += receive(sock, time.monotonic() + 3.0)
            # Then: no ping for as long as the loop was held, then pings again.
            pings = [t for t, data in got if "WATCHDOG=1" in data.splitlines()]
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) > 1.0, gaps
            assert pings[-1] > pings[gaps.index(max(gaps)) + 1] - 0.01  # pings resumed
            assert service.proc.poll() is None
        finally:
            service.stop()


def test_stopping_is_sent_once_even_on_a_second_signal(tmp_path: Path) -> None:
    # Given: a service with a run going on (so the drain takes a moment)
    path = str(tmp_path / "notify.sock")
    with notify_socket(path) as sock:
        service = Service(tmp_path, service_config(DEFAULT_PIPELINE), env={"NOTIFY_SOCKET": path})
        try:
            wait_for(sock, "READY=1", timeout=15)
            (tmp_path / "in" / "slow").write_text("1.5")
            service.wait_log("ingested")
            time.sleep(0.3)  # the run has started
            # When: SIGTERM, then SIGINT while it drains
            service.signal(signal.SIGTERM)
            wait_for(sock, "STOPPING=1", timeout=10)
            service.signal(signal.SIGINT)
            assert service.wait() == 0
            # Then: systemd heard STOPPING=1 once.
            later = receive(sock, time.monotonic() + 0.3)
        finally:
            service.stop()
    assert not [d for _, d in later if "STOPPING=1" in d.splitlines()]


def test_reload_is_told_to_systemd(tmp_path: Path) -> None:
    # systemd's reload protocol (`Type=notify-reload`, and what `systemctl reload` shows):
    # RELOADING=1 with the monotonic time, then READY=1 once the reload is done.
    path = str(tmp_path / "notify.sock")
    with notify_socket(path) as sock:
        service = Service(tmp_path, service_config(DEFAULT_PIPELINE), env={"NOTIFY_SOCKET": path})
        try:
            wait_for(sock, "READY=1", timeout=15)
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            service.signal(signal.SIGHUP)
            got = wait_for(sock, "READY=1", timeout=10)
            after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            assert service.proc.poll() is None
            metrics = service.get("/metrics")[1].decode()
            assert 'orchestrator_reloads_total{result="ok"} 1.0' in metrics
            assert 'orchestrator_reloads_total{result="failed"} 0.0' in metrics
        finally:
            service.stop()
    (reloading,) = [d.splitlines() for _, d in got if "RELOADING=1" in d.splitlines()]
    usec = int(next(line for line in reloading if line.startswith("MONOTONIC_USEC="))[15:])
    assert before <= usec <= after
    assert "reloaded; limits: unchanged" in service.log


def statuses(got: list[tuple[float, str]]) -> list[str]:
    """Every STATUS= line in ``got``, in order (a notification may hold other lines first)."""
    return [line[7:] for _, data in got for line in data.splitlines() if line.startswith("STATUS=")]


def test_the_counts_follow_ready_at_start_and_after_a_reload(tmp_path: Path) -> None:
    # Acceptance (session 17): READY=1 comes with STATUS=running, and an idle service's counts
    # were re-sent only when they changed: systemctl status showed just "running".
    path = str(tmp_path / "notify.sock")
    with notify_socket(path) as sock:
        # (A WatchdogSec of 200 s: long enough for the default loop_stall_timeout, no warning.)
        env = {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "200000000"}
        service = Service(tmp_path, service_config(DEFAULT_PIPELINE), env=env)
        try:
            # Given: a started service, idle
            got = wait_for(sock, "READY=1", timeout=15)
            # Then: the counts come after READY=1 (the stall check runs every second).
            got += receive(sock, time.monotonic() + 1.2)
            assert statuses(got)[-1].startswith("running: 0 queued, 0 running, 0 done"), got

            # When: it reloads (RELOADING=1, READY=1 again)
            service.signal(signal.SIGHUP)
            got = wait_for(sock, "READY=1", timeout=10)
            got += receive(sock, time.monotonic() + 1.5)
            # Then: the counts follow that READY=1 too.
            assert statuses(got)[-1].startswith("running: 0 queued, 0 running, 0 done"), got
            assert "WatchdogSec" not in service.log
        finally:
            service.stop()


def test_status_is_not_resent_every_second_while_one_condition_lasts(tmp_path: Path) -> None:
    # Acceptance (session 17): the reason's running age ("... 3s ago") changed STATUS= every
    # second for as long as the service was degraded; /health keeps the age.
    path = str(tmp_path / "notify.sock")
    with notify_socket(path) as sock:
        env = {"NOTIFY_SOCKET": path, "ORCH_TEST_BLOCK_LOOP": "0.6@0.3"}
        config = service_config(DEFAULT_PIPELINE + """
            [watchdog]
            loop_stall_warn = "0.3s"
            """)  # fmt: skip
        service = Service(tmp_path, config, env=env)
        try:
            # Given: a service whose loop was blocked for 0.6 s (degraded for a minute)
            service.wait_log("event loop ran again")
            # When: it goes on, idle, for 2.2 s
            got = receive(sock, time.monotonic() + 2.2)
            # Then: systemd heard the condition once, without its age; /health has the age.
            # (While blocked it said "blocked now": another condition.)
            degraded = [s for s in statuses(got) if "degraded: event loop was blocked" in s]
            assert len(degraded) == 1, got
            assert degraded[0].endswith(" by task 'test-hook:block-loop' in the last 60s")
            health = json.loads(service.get("/health")[1])
            assert health["reasons"][0].endswith("s ago"), health
        finally:
            service.stop()


UNIT = Path(__file__).resolve().parent.parent / "configs" / "orchestrator.service"


def unit_settings() -> dict[str, str]:
    settings = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key] = value
    return settings


def test_unit_file_fits_edge_toml() -> None:
    unit = unit_settings()
    edge = load_config(UNIT.parent / "edge.toml")
    assert unit["Type"] == "notify"
    assert unit["Restart"] == "on-failure"
    assert unit["KillMode"] == "mixed"
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert unit["ExecStart"].endswith(" run -c /etc/orchestrator/edge.toml")
    assert edge.state_dir == Path("/var/lib") / unit["StateDirectory"]
    assert edge.log.file is not None
    assert edge.log.file.parent == Path("/var/log") / unit["LogsDirectory"]
    # The state and log folders are private to the service's user, as the README says.
    assert unit["StateDirectoryMode"] == unit["LogsDirectoryMode"] == "0700"
    # The folders the sources read and move into are the ones the unit lets it write.
    writable = set(unit["ReadWritePaths"].split())
    [source] = edge.sources
    assert {str(source.path), str(source.on_done.dir), str(source.on_dead.dir)} <= writable
    # The drain (and the cancelled runs' kill escalation and records) fits in TimeoutStopSec.
    drain = (edge.shutdown_grace + max(s.grace_period for s in edge.stages) + RECORD_GRACE
             + FINAL_STATUS_GRACE)  # fmt: skip
    assert parse_duration(unit["TimeoutStopSec"]) > drain
    # The service's own loop watchdog (and faulthandler after it) acts before systemd's, even
    # for a loop blocked just before a ping (every WatchdogSec/2) was due (session 17: 90 s).
    watchdog_sec = parse_duration(unit["WatchdogSec"])
    assert watchdog_sec / 2 > edge.watchdog.loop_stall_timeout + FAULTHANDLER_MARGIN
    assert watchdog_sec > shortest_watchdog_sec(edge.watchdog.loop_stall_timeout)


def test_unit_file_passes_systemd_analyze(tmp_path: Path) -> None:
    analyze = need_tool("systemd-analyze", "checks the unit file; Debian's systemd package")
    # The unit names the installed program; point it at this checkout's.
    program = Path(sys.executable).parent / "orchestrator"
    unit = tmp_path / "orchestrator.service"
    unit.write_text(UNIT.read_text().replace("/opt/orchestrator/bin/orchestrator", str(program)))
    proc = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True,
                          timeout=60, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert not proc.stderr.strip()

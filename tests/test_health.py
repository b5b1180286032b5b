"""`orchestrator health`: the status file judged from outside -- fresh, stale, frozen, dead, restarted."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

import pytest
from conftest import PY, fill
from servicekit import DEFAULT_PIPELINE, Service, service_config

from orchestrator.cli import EXIT_CRITICAL, EXIT_OK, EXIT_UNKNOWN, EXIT_WARNING, main
from orchestrator.config import parse_config
from orchestrator.health import (
    CRITICAL,
    OK,
    STARTING_LIMIT,
    WARNING,
    Verdict,
    judge,
    starting_limit,
    watch,
)

if TYPE_CHECKING:
    from pathlib import Path

NOW = 1_800_000_000.0


def status_doc(**overrides: Any) -> dict[str, Any]:
    started = time.time()  # this (test) process started before: it may stand for the service
    doc = {
        "pid": os.getpid(), "host": socket.gethostname(), "state": "running", "interval": 10.0,
        "started": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "updated": "2027-01-15T08:00:00+00:00", "updated_unix": NOW,
    }  # fmt: skip
    doc.update(overrides)
    return doc


def write(path: Path, doc: dict[str, Any]) -> Path:
    path.write_text(json.dumps(doc))
    return path


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize(
    ("age", "level"),
    [(0.0, OK), (19.9, OK), (20.0, WARNING), (39.9, WARNING), (40.0, CRITICAL), (3600, CRITICAL)],
)
def test_judge_by_age_in_intervals(tmp_path: Path, age: float, level: int) -> None:
    path = write(tmp_path / "status.json", status_doc())
    verdict = judge(path, interval=99, now=NOW + age)  # the file's own interval (10 s) wins
    assert verdict.level == level, verdict
    assert verdict.interval == 10.0
    assert verdict.pid_alive is True


def test_judge_pid_gone_is_critical_even_when_fresh(tmp_path: Path) -> None:
    pid = dead_pid()
    verdict = judge(write(tmp_path / "s.json", status_doc(pid=pid)), interval=10, now=NOW)
    assert verdict.level == CRITICAL
    assert verdict.reasons == (f"its process (pid {pid}) is gone",)
    assert verdict.pid_alive is False


def test_judge_pid_reused_by_a_younger_process_is_critical(tmp_path: Path) -> None:
    # This test process started long after the "service" said it started: not the service.
    doc = status_doc(started="2001-01-01T00:00:00+00:00")
    verdict = judge(write(tmp_path / "s.json", doc), interval=10, now=NOW)
    assert verdict.level == CRITICAL
    assert "now belongs to another process" in verdict.reasons[0]


def test_judge_other_host_skips_the_pid(tmp_path: Path) -> None:
    doc = status_doc(pid=dead_pid(), host="elsewhere")
    verdict = judge(write(tmp_path / "s.json", doc), interval=10, now=NOW + 1)
    assert verdict.level == OK
    assert verdict.pid_alive is None


def test_judge_stopped_missing_garbage_and_service_problems(tmp_path: Path) -> None:
    stopped = judge(write(tmp_path / "a.json", status_doc(state="stopped")), interval=10, now=NOW)
    assert stopped.level == CRITICAL
    assert stopped.reasons == ("the service stopped at 2027-01-15T08:00:00+00:00",)
    # A service whose store failed says so last (session 17): its process is gone, as expected.
    failed = status_doc(state="failed", reason="its store failed: database is locked",
                        pid=dead_pid())  # fmt: skip
    verdict = judge(write(tmp_path / "f.json", failed), interval=10, now=NOW)
    assert verdict.level == CRITICAL
    assert verdict.reasons == (
        "the service stopped at 2027-01-15T08:00:00+00:00: its store failed: database is locked",
    )

    missing = judge(tmp_path / "nope.json", interval=10)
    assert missing.level == CRITICAL
    assert "no status file at" in missing.reasons[0]

    (tmp_path / "bad.json").write_text("{not json")
    assert judge(tmp_path / "bad.json", interval=10).level == CRITICAL

    unwell = status_doc(health={"status": "degraded", "reasons": ["store: disk full"]})
    verdict = judge(write(tmp_path / "b.json", unwell), interval=10, now=NOW)
    assert verdict.level == WARNING
    assert verdict.reasons == ("store: disk full",)


def test_judge_dead_or_stale_reasons_are_as_of_the_last_write(tmp_path: Path) -> None:
    # Acceptance (session 17): after an exit 70, `health` repeated "... blocked ... 14s ago"
    # from a status file minutes old, as if it were now.
    said = "event loop was blocked for 8.0s by task 'x' 14s ago"
    unwell = {"health": {"status": "degraded", "reasons": [said]}}
    # Given: its process is gone (the file is fresh)
    pid = dead_pid()
    dead = judge(write(tmp_path / "a.json", status_doc(pid=pid, **unwell)), interval=10, now=NOW)
    assert dead.reasons == (
        f"its process (pid {pid}) is gone",
        f"its last status (written 0s ago) said: {said}",
    )
    # Given: its process lives but the file is 464 s old
    stale = judge(write(tmp_path / "b.json", status_doc(**unwell)), interval=10, now=NOW + 464)
    assert stale.level == CRITICAL
    assert stale.reasons[1] == f"its last status (written 464s ago) said: {said}"
    # Given: the file is fresh and its process alive: the reasons are its own, as they are.
    fresh = judge(write(tmp_path / "c.json", status_doc(**unwell)), interval=10, now=NOW + 5)
    assert fresh.reasons == (said,)


def test_watch_restarts_when_critical_with_doubling_backoff(tmp_path: Path) -> None:
    # Given: a service that is critical for 8 rounds of 1 s, then ok, then critical again.
    marker = tmp_path / "restarts"
    argv = [PY, "-c", "import os, sys; open(sys.argv[1], 'a').write("
            "os.environ['ORCH_HEALTH_STATUS'] + ' ' + os.environ.get('ORCH_HEALTH_PID', '-') + '\\n')",
            str(marker)]  # fmt: skip
    levels = [CRITICAL] * 8 + [OK, CRITICAL]
    clock = [0.0]
    seen: list[tuple[float, str | None]] = []

    def verdict() -> Verdict:
        return Verdict(level=levels[len(seen)], reasons=("x",), path="p")

    def report(v: Verdict, action: str | None) -> None:
        seen.append((clock[0], action))

    def sleep(seconds: float) -> None:
        clock[0] += seconds

    # When
    watch(verdict, argv, interval=1.0, backoff=1.0, backoff_max=4.0, report=report,
          sleep=sleep, clock=lambda: clock[0], rounds=len(levels))  # fmt: skip

    # Then: restarts at 0, 1, 3, 7 (backoff 1, 2, 4, capped at 4), and at once after an ok.
    restarted = [t for t, action in seen if action]
    assert restarted == [0.0, 1.0, 3.0, 7.0, 9.0]
    assert all("exit status 0" in a for _, a in seen if a)
    assert marker.read_text().splitlines() == ["critical -"] * 5


def test_health_cli_exit_codes_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text(service_config(DEFAULT_PIPELINE, listen="false"))
    (tmp_path / "state").mkdir()
    status = tmp_path / "state" / "status.json"

    assert main(["health", "-c", str(config)]) == EXIT_CRITICAL  # no status file yet
    assert "no status file" in capsys.readouterr().out

    write(status, status_doc(updated_unix=time.time(), interval=10))
    assert main(["health", "-c", str(config)]) == EXIT_OK
    assert capsys.readouterr().out.startswith("ok: running, pid")

    write(status, status_doc(updated_unix=time.time() - 25, interval=10))
    assert main(["health", "-c", str(config), "--json"]) == EXIT_WARNING
    doc = json.loads(capsys.readouterr().out)
    assert doc["status"] == "warning"
    assert doc["exit"] == 1
    assert doc["pid"] == os.getpid()

    assert main(["health", "-c", str(config), "--restart-cmd", "true"]) == EXIT_UNKNOWN
    assert main(["health", "-c", str(config), "--watch", "--restart-cmd", "'x"]) == EXIT_UNKNOWN
    # Nothing judged is unknown (3), never critical (2): a monitor would page for a typo.
    assert main(["health", "-c", str(config), "--watch", "--restart-cmd", ""]) == EXIT_UNKNOWN
    assert main(["health", "-c", str(config), "--bogus"]) == EXIT_UNKNOWN
    assert main(["health", "-c", str(config), "--watch", "--interval", "nan"]) == EXIT_UNKNOWN
    assert main(["health", "-c", str(tmp_path / "nope.toml")]) == EXIT_UNKNOWN
    assert main(["status", "-c", str(config), "--bogus"]) == 2  # other commands: click's 2
    assert "No closing quotation" in capsys.readouterr().err


def health(config: Path) -> tuple[int, dict[str, Any]]:
    proc = subprocess.run([PY, "-m", "orchestrator", "health", "-c", str(config), "--json"],
                          capture_output=True, text=True, timeout=20, check=False)  # fmt: skip
    return proc.returncode, json.loads(proc.stdout)


def wait_health(config: Path, code: int, timeout: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        got, doc = health(config)
        if got == code or time.monotonic() > deadline:
            assert got == code, doc
            return doc
        time.sleep(0.1)


def test_frozen_service_is_critical_then_fresh_after_sigcont(tmp_path: Path) -> None:
    # Given: a running service rewriting its status file every 0.3 s; a loop-block watchdog
    # that would end it after 1 s of blocked loop (a frozen process must not count as that).
    config = service_config(DEFAULT_PIPELINE + """
        [watchdog]
        loop_stall_warn = "0.5s"
        loop_stall_timeout = "1s"
        """)  # fmt: skip
    service = Service(tmp_path, config)
    try:
        wait_health(service.config_path, EXIT_OK, timeout=15)

        # When: it is frozen
        service.signal(signal.SIGSTOP)
        # Then: critical once the file is 4 intervals (1.2 s) old
        doc = wait_health(service.config_path, EXIT_CRITICAL, timeout=5)
        assert doc["pid_alive"] is True
        assert "the service is hung, frozen or dead" in doc["reasons"][0]

        # When: it runs again
        service.signal(signal.SIGCONT)
        # Then: fresh again within an interval or two; it was not taken for a blocked loop.
        wait_health(service.config_path, EXIT_OK, timeout=3)
        time.sleep(0.5)
        assert service.proc.poll() is None, service.log
        assert "event loop blocked" not in service.log
    finally:
        code = service.stop()
    assert code == 0


def test_watch_restarts_a_killed_service(tmp_path: Path) -> None:
    # Given: a running service, and a watcher whose restart command starts it again.
    service = Service(tmp_path, service_config(DEFAULT_PIPELINE))
    config = service.config_path
    restarted_pids: list[int] = []
    watcher = None
    try:
        first = wait_health(config, EXIT_OK, timeout=15)["pid"]
        start = (
            f"exec {shlex.quote(PY)} -m orchestrator run -c {shlex.quote(str(config))} "
            f">>{shlex.quote(str(tmp_path / 'restarted.log'))} 2>&1 &"
        )
        watcher = subprocess.Popen(
            [PY, "-m", "orchestrator", "health", "-c", str(config), "--watch", "--json",
             "--interval", "0.2", "--backoff", "5", "--restart-cmd", f"sh -c {shlex.quote(start)}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

        # When: the service dies hard
        service.signal(signal.SIGKILL)
        service.wait()

        # Then: the watcher finds it critical (pid gone) and its command brings a new one up.
        verdicts = []
        assert watcher.stdout is not None
        deadline = time.monotonic() + 20
        for line in watcher.stdout:
            verdicts.append(json.loads(line))
            if verdicts[-1]["status"] == "ok" and verdicts[-1]["pid"] != first:
                break
            assert time.monotonic() < deadline, verdicts
        restarted_pids.append(verdicts[-1]["pid"])
        actions = [v["action"] for v in verdicts if v["action"]]
        assert len(actions) == 1, actions  # backoff: one restart, not one per verdict
        assert "exit status 0" in actions[0]
        critical = [v for v in verdicts if v["status"] == "critical"]
        assert critical
        assert f"its process (pid {first}) is gone" in critical[0]["reasons"]
    finally:
        if watcher is not None:
            watcher.send_signal(signal.SIGINT)
            assert watcher.wait(10) == 0
            assert watcher.stdout is not None
            watcher.stdout.close()
        service.stop()
        for pid in restarted_pids:
            os.kill(pid, signal.SIGTERM)
        for pid in restarted_pids:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)


# --- a service starting, a status file that cannot be written, a source that is missing ---------


def test_judge_starting_is_a_warning_until_the_starting_limit(tmp_path: Path) -> None:
    # Elsewhere: its pid is not looked at, only what the file says.
    doc = status_doc(host="elsewhere", state="starting", updated_unix=NOW,
                     phase="ending the processes a dead instance left running")  # fmt: skip
    started = NOW - 42.0
    doc["started"] = dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds")
    starting = judge(write(tmp_path / "s.json", doc), interval=10, now=NOW)
    assert starting.level == WARNING
    assert starting.state == "starting"
    pid = os.getpid()
    assert starting.reasons == (
        f"starting (pid {pid}) for 42.0s: ending the processes a dead instance left running",
    )
    assert starting.describe().startswith(f"warning: starting (pid {pid}) for 42.0s")

    # Still rewriting its file, but starting for longer than STARTING_LIMIT: stuck.
    late = NOW + STARTING_LIMIT
    doc["updated_unix"] = late
    stuck = judge(write(tmp_path / "s.json", doc), interval=10, now=late)
    assert stuck.level == CRITICAL
    assert stuck.reasons == (
        f"still starting (pid {pid}) after {STARTING_LIMIT + 42:.0f}s (more than"
        f" {STARTING_LIMIT:g}s), stuck at: ending the processes a dead instance left running",
    )

    # A config whose leftovers may take longer to end (a grace_period of 20 minutes) is given
    # the time: twice the longest grace and a minute.
    patient = judge(write(tmp_path / "s.json", doc), interval=10, now=late, starting_limit=2460)
    assert patient.level == WARNING
    cfg = parse_config({"stages": [{"name": "s", "command": ["true"], "grace_period": "20m"}]},
                       base_dir=tmp_path)  # fmt: skip
    assert starting_limit(cfg) == 2460
    cfg = parse_config({"stages": [{"name": "s", "command": ["true"]}]}, base_dir=tmp_path)
    assert starting_limit(cfg) == STARTING_LIMIT

    # A starting file that is not rewritten (its loop hangs) goes stale like any other.
    stale = judge(write(tmp_path / "s.json", doc), interval=10, now=late + 40)
    assert stale.level == CRITICAL
    assert "the service is hung, frozen or dead" in stale.reasons[0]


#: A stage that ignores SIGTERM: after its service is killed, the next start's recovery waits
#: its whole grace period before the SIGKILL.
STUBBORN_PIPELINE = f"""
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    settle = "0s"
    poll_interval = "0.1s"
    route = ["work"]
    [[stages]]
    name = "work"
    command = ["{PY}", "-c", "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(60)"]
    grace_period = "7s"
    """


def test_watch_does_not_restart_a_service_that_is_still_starting_and_reload_waits_for_it(
    tmp_path: Path,
) -> None:
    # Given: a service whose run ignores SIGTERM, and a watcher (backoff 4 s) whose restart
    # command starts the service again. (Found by acceptance testers: while the new service
    # recovered, the file still named the dead pid, and the watcher started it again.)
    service = Service(tmp_path, service_config(STUBBORN_PIPELINE, interval=0.2))
    config = service.config_path
    restarted = tmp_path / "restarted.log"
    pids: list[int] = []
    watcher = reload = None
    try:
        first = wait_health(config, EXIT_OK, timeout=15)["pid"]
        (tmp_path / "in" / "a").write_text("")
        deadline = time.monotonic() + 15
        while not service.status()["running"]:
            assert time.monotonic() < deadline, service.log
            time.sleep(0.05)
        start = (
            f"exec {shlex.quote(PY)} -m orchestrator run -c {shlex.quote(str(config))} "
            f">>{shlex.quote(str(restarted))} 2>&1 &"
        )
        watcher = subprocess.Popen(
            [PY, "-m", "orchestrator", "health", "-c", str(config), "--watch", "--json",
             "--interval", "0.2", "--backoff", "4", "--restart-cmd", f"sh -c {shlex.quote(start)}"],
            stdout=subprocess.PIPE, text=True,
        )  # fmt: skip

        # When: the service dies hard; its run lives on, and the next start must end it,
        # waiting 7 s of grace_period for a SIGTERM it ignores
        service.signal(signal.SIGKILL)
        service.wait()

        # Then: while the new service recovers, the watcher sees it starting (a warning, with
        # its own pid) and does not restart it again; then it is ok.
        verdicts = []
        assert watcher.stdout is not None
        deadline = time.monotonic() + 40
        for line in watcher.stdout:
            verdict = json.loads(line)
            verdicts.append(verdict)
            if verdict["pid"] not in (first, None) and verdict["pid"] not in pids:
                pids.append(verdict["pid"])
            if verdict["state"] == "starting" and reload is None:
                # (`orchestrator reload` meanwhile: the service takes the SIGHUP, answers later;
                # its --timeout counts from when the service runs, not from the SIGHUP)
                reload = subprocess.Popen(
                    [PY, "-m", "orchestrator", "reload", "-c", str(config), "--timeout", "2"],
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                )  # fmt: skip
            if verdict["status"] == "ok" and verdict["pid"] != first:
                break
            assert time.monotonic() < deadline, (verdicts, restarted.read_text())
        actions = [v["action"] for v in verdicts if v["action"]]
        assert len(actions) == 1, (actions, restarted.read_text())
        starting = [v for v in verdicts if v["state"] == "starting"]
        assert len(starting) > 10, verdicts  # 7 s of recovery, judged every 0.2 s
        assert {(v["status"], v["exit"], v["pid"], v["pid_alive"]) for v in starting} == {
            ("warning", 1, pids[0], True)
        }
        assert any("ending the processes a dead instance left running" in v["reasons"][0]
                   for v in starting)  # fmt: skip
        assert pids == [verdicts[-1]["pid"]]
        assert "another instance" not in restarted.read_text()
        assert reload is not None
        assert reload.communicate(timeout=30) == ("reloaded: limits unchanged\n", None)
        assert reload.returncode == 0
    finally:
        if reload is not None and reload.poll() is None:
            reload.kill()
            reload.wait()
        if watcher is not None:
            watcher.send_signal(signal.SIGINT)
            watcher.wait(10)
            assert watcher.stdout is not None
            watcher.stdout.close()
        service.stop()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        for pid in pids:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and os.path.exists(f"/proc/{pid}"):
                time.sleep(0.05)


def test_a_status_file_that_cannot_be_written_makes_health_503_until_it_can(
    tmp_path: Path, disk: Path
) -> None:
    # Given: a service whose status file is on a 1 MiB file system
    status = disk / "status.json"
    config = service_config(DEFAULT_PIPELINE).replace(
        "[status]\n", f"[status]\nfile = {str(status)!r}\n"
    )
    service = Service(tmp_path, config)
    try:
        wait_health(service.config_path, EXIT_OK, timeout=15)
        assert service.get("/health")[0] == 200

        # When: that file system is full
        filler = fill(disk)

        # Then: /health is 503 and says why, as the metrics do; `health` finds the file stale.
        reason = (
            f"status file {str(status)!r} cannot be written: [Errno 28] No space left on device"
        )
        deadline = time.monotonic() + 10
        while (got := service.get("/health"))[0] != 503:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        assert json.loads(got[1]) == {"status": "degraded", "reasons": [reason]}
        assert "orchestrator_status_file_write_failed 1.0" in service.get("/metrics")[1].decode()
        doc = wait_health(service.config_path, EXIT_CRITICAL, timeout=5)
        assert "or cannot write this file" in doc["reasons"][0]
        time.sleep(1.0)  # several more failed writes (every 0.3 s): logged once
        assert service.log.count("cannot be written") == 1, service.log
        # No half-written temp file is left to hold the space.
        assert sorted(p.name for p in disk.iterdir()) == ["filler", "status.json"]

        # When: there is room again
        filler.unlink()

        # Then: healthy everywhere again, and the file does not keep the failure it had.
        wait_health(service.config_path, EXIT_OK, timeout=5)
        deadline = time.monotonic() + 5
        while (health := json.loads(status.read_text())["health"])["status"] != "ok":
            assert time.monotonic() < deadline, health
            time.sleep(0.05)
        assert service.get("/health")[0] == 200
        assert "orchestrator_status_file_write_failed 0.0" in service.get("/metrics")[1].decode()
        assert service.log.count("written again") == 1, service.log
    finally:
        code = service.stop()
    assert code == 0, service.log


def test_a_status_file_failure_naming_the_temp_file_is_still_logged_once(tmp_path: Path) -> None:
    # Acceptance (session 17): an error about the temp file (its folder replaced by a file:
    # ENOTDIR) named that file, new at each try: logged at every tick, /health changing with it.
    folder = tmp_path / "sdir"
    folder.mkdir()
    status = folder / "status.json"
    config = service_config(DEFAULT_PIPELINE).replace(
        "[status]\n", f"[status]\nfile = {str(status)!r}\n"
    )
    service = Service(tmp_path, config)
    try:
        wait_health(service.config_path, EXIT_OK, timeout=15)

        # When: the status file's folder is replaced by a plain file
        status.unlink()
        folder.rmdir()
        folder.write_text("")

        # Then: /health says so with the status file's name and the error, the same at each try
        reason = f"status file {str(status)!r} cannot be written: [Errno 20] Not a directory"
        deadline = time.monotonic() + 10
        while (got := service.get("/health"))[0] != 503:
            assert time.monotonic() < deadline, got
            time.sleep(0.1)
        assert json.loads(got[1]) == {"status": "degraded", "reasons": [reason]}
        time.sleep(1.0)  # several more failed writes (every 0.3 s): logged once
        assert json.loads(service.get("/health")[1])["reasons"] == [reason]
        assert service.log.count("cannot be written") == 1, service.log
    finally:
        code = service.stop()
    assert code == 0, service.log


def test_a_missing_source_folder_is_degraded_in_every_view_and_logged_once(tmp_path: Path) -> None:
    # Given: a running, healthy service
    service = Service(tmp_path, service_config(DEFAULT_PIPELINE))
    folder = tmp_path / "in"
    try:
        wait_health(service.config_path, EXIT_OK, timeout=15)
        assert service.status()["sources"] == {
            "in": {"type": "directory", "path": str(folder), "problem": None}
        }

        # When: its source folder goes away (a mount that dropped)
        folder.rmdir()

        # Then: /health is 503 degraded with the reason, the status file names it for the
        # source, `health` warns with it (exit 1: not restarted), the log says it once.
        reason = (
            f"source 'in': cannot list {str(folder)!r}: No such file or directory; nothing is"
            " taken until it can be"
        )
        doc = wait_health(service.config_path, EXIT_WARNING, timeout=5)
        assert doc["reasons"] == [reason]
        status, body, _ = service.get("/health")
        assert (status, json.loads(body)) == (503, {"status": "degraded", "reasons": [reason]})
        assert service.status()["sources"]["in"]["problem"] == reason
        assert 'orchestrator_source_problem{source="in"} 1.0' in service.get("/metrics")[1].decode()
        time.sleep(1.0)  # ten more polls
        assert service.log.count(f"cannot list {str(folder)!r}") == 1, service.log

        # When: it comes back
        folder.mkdir()
        # Then: healthy again, said once.
        wait_health(service.config_path, EXIT_OK, timeout=5)
        assert service.get("/health")[0] == 200
        assert service.status()["sources"]["in"]["problem"] is None
        assert service.log.count(f"{str(folder)!r} can be listed again") == 1, service.log

        # When: its poller fails (the folder is a symbolic link to itself: ELOOP)
        folder.rmdir()
        folder.symlink_to(folder)
        # Then: that is degraded too, until a poll reads the folder again.
        doc = wait_health(service.config_path, EXIT_WARNING, timeout=5)
        assert doc["reasons"][0].startswith("source 'in': its poller failed (OSError: [Errno 40]")
        folder.unlink()
        folder.mkdir()
        wait_health(service.config_path, EXIT_OK, timeout=10)
        assert service.get("/health")[0] == 200
    finally:
        code = service.stop()
    assert code == 0, service.log


def test_a_json_source_that_does_not_parse_is_degraded_until_it_does(tmp_path: Path) -> None:
    # Acceptance (session 15): a json source whose file never parses (an object, not an array)
    # said so once in the log and nowhere an operator monitors.
    (tmp_path / "a.json").write_text('{"not": "an array"}')
    service = Service(tmp_path, service_config("""
        [[sources]]
        name = "arr"
        type = "json"
        path = "a.json"
        id_field = "id"
        poll_interval = "100ms"
        route = ["work"]
        [[stages]]
        name = "work"
        command = ["true"]
        """))  # fmt: skip
    try:
        deadline = time.monotonic() + 15
        while True:  # (first it says "starting", then the source's problem)
            doc = wait_health(service.config_path, EXIT_WARNING, timeout=15)
            if any("did not parse" in r for r in doc["reasons"]):
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        [reason] = doc["reasons"]
        assert reason.startswith(f"source 'arr': {str(tmp_path / 'a.json')!r} did not parse at ")
        assert "not a JSON array but an object" in reason
        assert service.get("/health")[0] == 503
        (tmp_path / "a.json").write_text('[{"id": 1}]')
        wait_health(service.config_path, EXIT_OK, timeout=10)
        assert service.get("/health")[0] == 200
    finally:
        code = service.stop()
    assert code == 0, service.log


def test_the_status_file_is_never_written_through_a_planted_symlink(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found by an acceptance tester (session 16): the temp file's name was predictable
    # (".status.json.<pid>.tmp") and opened with O_TRUNC through symlinks: another user able to
    # write a shared status folder could make the service overwrite any file it can write.
    import secrets

    from orchestrator.status import write_atomically

    victim = tmp_path / "victim"
    victim.write_text("precious")
    status = tmp_path / "status.json"
    write_atomically(status, b"{}")
    names = set()
    for _ in range(3):
        write_atomically(status, b"{}")
        names |= {p.name for p in tmp_path.iterdir()}
    assert names == {"victim", "status.json"}  # no temp file left behind
    # Given: the name the next temp file gets, planted as a symlink to the victim
    monkeypatch.setattr(secrets, "token_hex", lambda n: "planted")
    (tmp_path / ".status.json.planted.tmp").symlink_to(victim)
    # When / Then: the write fails instead of following it; the victim is untouched.
    with pytest.raises(FileExistsError):
        write_atomically(status, b'{"new": 1}')
    assert victim.read_text() == "precious"
    assert status.read_bytes() == b"{}"


def test_health_and_status_do_not_hang_on_a_status_file_that_is_a_fifo(tmp_path: Path) -> None:
    # Found by a fix helper (session 16): `health` (run by watchdogs) opened the status file
    # with a plain open(), which waits for ever on a FIFO with no writer.
    config = tmp_path / "c.toml"
    config.write_text(
        '[status]\nfile = "status.fifo"\n[[stages]]\nname = "x"\ncommand = ["true"]\n'
    )
    batch = [sys.executable, "-m", "orchestrator", "batch", "-c", str(config), "--json"]
    assert subprocess.run(batch, capture_output=True, timeout=60, check=False).returncode == 0
    (tmp_path / "status.fifo").unlink()  # (the batch's status file)
    os.mkfifo(tmp_path / "status.fifo")
    for command in ("health", "status"):
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", command, "-c", str(config)],
            capture_output=True, text=True, timeout=20, check=False,
        )  # fmt: skip
        assert "not a regular file" in proc.stdout + proc.stderr, (command, proc)

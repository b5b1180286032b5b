"""SIGHUP: limits reloaded and the log file reopened in a running service; a closed terminal drains.

The limits are checked from the OS (live processes carrying the service's state marker, and
the lock files `locked_stage.py` takes), the terminal is a real pseudo-terminal hung up by
closing its master side.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import subprocess
import textwrap
import threading
import time
from pathlib import Path

import pytest
from conftest import processes_with_env
from servicekit import PY, Service

from orchestrator.config import parse_config
from orchestrator.reaper import STATE_MARKER
from orchestrator.reload import compare_configs

PROGRAMS = Path(__file__).parent / "programs"
STAGE = str(PROGRAMS / "locked_stage.py")

BASE = {
    "sources": [{"name": "in", "type": "directory", "path": "in", "route": ["a", "b"]}],
    "pools": {"gpu": 1, "disk": 2},
    "stages": [
        {"name": "a", "command": ["true"], "concurrency": 1, "pools": ["gpu"]},
        {"name": "b", "command": ["true"], "concurrency": 2, "timeout": "30s"},
    ],
}


def _with(change: dict[str, object], stage: int | None = None) -> dict[str, object]:
    """BASE with ``change`` merged into one stage (``stage``) or at the top level."""
    doc: dict[str, object] = {**BASE, "stages": [dict(s) for s in BASE["stages"]]}  # type: ignore[attr-defined]
    if stage is None:
        doc.update(change)
    else:
        doc["stages"][stage].update(change)  # type: ignore[index]
    return doc


def test_compare_sees_limits_apart_from_the_keys_that_take_a_restart() -> None:
    old = parse_config(BASE, base_dir="/x")
    assert compare_configs(old, parse_config(BASE, base_dir="/x")).describe() == (
        "limits: unchanged"
    )
    raised = compare_configs(old, parse_config(_with({"concurrency": 4}, 1), base_dir="/x"))
    assert raised.stages == {"b": (2, 4)}
    assert raised.pools == {}
    assert raised.not_applied == ()
    assert raised.describe() == "limits: stages[b].concurrency 2 → 4"

    pools = compare_configs(old, parse_config(_with({"pools": {"gpu": 3, "disk": 2}}),
                                              base_dir="/x"))  # fmt: skip
    assert pools.pools == {"gpu": (1, 3)}
    assert pools.stages == {}

    mixed = _with({"concurrency": 5, "timeout": "1m", "command": ["false"]}, 1)
    mixed["log"] = {"level": "DEBUG"}
    mixed["sources"] = [{**BASE["sources"][0], "pattern": "*.pdf"}]  # type: ignore[index]
    changes = compare_configs(old, parse_config(mixed, base_dir="/x"))
    assert changes.stages == {"b": (2, 5)}
    # Each stage and source named by its name, as the limits applied are (found by an
    # acceptance tester, session 17: "stages[b].concurrency" beside "stages[1].timeout").
    assert set(changes.not_applied) == {  # ([log] is applied: reopen_logs)
        "stages[b].timeout", "stages[b].command", "sources[in].pattern",
    }  # fmt: skip
    # [log] is applied at once, and said (found by an acceptance tester, session 16: a reload
    # that turned DEBUG on printed "limits unchanged").
    assert changes.log == ("log.level INFO → DEBUG",)
    assert changes.applied() == ["stages[b].concurrency 2 → 5", "log.level INFO → DEBUG"]
    assert changes.describe().startswith(
        "limits: stages[b].concurrency 2 → 5; log.level INFO → DEBUG; changed but not"
    )

    reshaped = _with({"pools": {"gpu": 1, "net": 1}})
    reshaped["stages"] = [BASE["stages"][1], {"name": "c", "command": ["true"]}]  # type: ignore[index]
    reshaped["sources"] = [{**BASE["sources"][0], "route": ["b", "c"]}]  # type: ignore[index]
    changes = compare_configs(old, parse_config(reshaped, base_dir="/x"))
    assert set(changes.not_applied) == {
        "stages[c] (new stage)", "stages[a] (removed)", "pools.net (new pool)",
        "pools.disk (removed)", "sources[in].route (for items ingested after it)",
    }  # fmt: skip
    renamed = _with({})
    renamed["sources"] = [{**BASE["sources"][0], "name": "inbox"}]  # type: ignore[index]
    assert set(compare_configs(old, parse_config(renamed, base_dir="/x")).not_applied) == {
        "sources[inbox] (new source)", "sources[in] (removed)",
    }  # fmt: skip
    # The same stages in another order: a restart.
    swapped = _with({})
    swapped["stages"] = [BASE["stages"][1], BASE["stages"][0]]  # type: ignore[index]
    assert compare_configs(old, parse_config(swapped, base_dir="/x")).not_applied == (
        "stages (order)",
    )


_TERMINAL_PROBE = """
import os, signal, sys, time
from orchestrator.terminal import Terminal
signal.signal(signal.SIGHUP, signal.SIG_IGN)
terminal = Terminal()
report = os.open(sys.argv[1], os.O_WRONLY | os.O_APPEND)
os.write(report, f"start {terminal.had} {terminal.gone()}\\n".encode())
deadline = time.monotonic() + 10
while not terminal.gone() and time.monotonic() < deadline:
    time.sleep(0.02)
os.write(report, f"later {terminal.gone()}\\n".encode())
"""

#: Runs argv[2:] with its stdin (a terminal) as its controlling terminal; started in a new
#: session, it is the session leader, so a hang-up of the terminal sends it SIGHUP. With argv[1]
#: "nohup", SIGHUP is ignored first, as nohup does.
_ON_TERMINAL = (
    "import fcntl, os, signal, sys, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "sys.argv[1] == 'nohup' and signal.signal(signal.SIGHUP, signal.SIG_IGN); "
    "os.execv(sys.argv[2], sys.argv[2:])"
)


class _PseudoTerminal:
    """A program in a session of its own on a pseudo-terminal, whose output is read (so it
    never blocks writing) until `hang_up` closes the terminal's master side."""

    def __init__(self, argv: list[str], *, cwd: Path, nohup: bool = False) -> None:
        self.master, slave = os.openpty()
        self.output = bytearray()
        self._stop = threading.Event()
        try:
            self.proc = subprocess.Popen(
                [PY, "-c", _ON_TERMINAL, "nohup" if nohup else "-", *argv], stdin=slave,
                stdout=slave, stderr=slave, cwd=cwd, start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(slave)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.output += os.read(self.master, 65536)
                except OSError:  # EIO: every slave side is closed
                    return

    def hang_up(self) -> None:
        self._stop.set()
        self._reader.join(5)
        os.close(self.master)
        self.master = -1

    def close(self) -> None:
        if self.master >= 0:
            self.hang_up()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _wait_for(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_terminal_tells_a_hang_up_from_a_reload_request(tmp_path: Path) -> None:
    # Without a controlling terminal (systemd, setsid): a SIGHUP is never a hang-up.
    report = tmp_path / "report"
    report.write_text("")
    probe = [PY, "-c", _TERMINAL_PROBE.replace("deadline = time.monotonic() + 10",
                                               "deadline = 0"), str(report)]  # fmt: skip
    subprocess.run(probe, start_new_session=True, stdin=subprocess.DEVNULL, check=True,
                   capture_output=True, timeout=30)  # fmt: skip
    assert report.read_text().split("\n")[:2] == ["start False False", "later False"]
    # On a terminal: not gone while it is there, gone once it hung up.
    report.write_text("")
    terminal = _PseudoTerminal([PY, "-c", _TERMINAL_PROBE, str(report)], cwd=tmp_path)
    try:
        _wait_for(lambda: report.read_text(), 20, "the probe never started")
        assert report.read_text() == "start True False\n"
        terminal.hang_up()
        assert terminal.proc.wait(20) == 0
        assert report.read_text() == "start True False\nlater True\n"
    finally:
        terminal.close()


def _config(folder: Path, concurrency: int, *, extra: str = "", log_file: bool = False) -> str:
    """One folder source → stage ``work``: `locked_stage.py` with 3 lock files, for as many
    seconds as the file says."""
    (folder / "locks").mkdir(exist_ok=True)
    log = '[log]\nfile = "logs/orchestrator.log"\n' if log_file else ""
    return textwrap.dedent("""
        shutdown_grace = "1s"
        [http]
        listen = false
        [status]
        interval = "0.3s"
        """) + log + textwrap.dedent(f"""
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["work"]
        settle = "0s"
        poll_interval = "100ms"
        [[stages]]
        name = "work"
        command = ["{PY}", "{STAGE}", "{folder / 'locks'}", "3", "{folder / 'record'}", "@path"]
        concurrency = {concurrency}
        {extra}
        """)  # fmt: skip


def _live(folder: Path) -> int:
    """How many stage processes of the service on ``folder`` are alive now (from /proc)."""
    return len(processes_with_env(f"{STATE_MARKER}={folder / 'state'}"))


def _most_alive(folder: Path, seconds: float) -> int:
    most, deadline = 0, time.monotonic() + seconds
    while time.monotonic() < deadline:
        most = max(most, _live(folder))
        time.sleep(0.01)
    return most


def test_sighup_applies_a_new_concurrency_to_a_running_service(tmp_path: Path) -> None:
    # Given: a service running a stage at concurrency 1, with 40 items of 0.4 s each.
    inbox = tmp_path / "in"
    inbox.mkdir()
    for i in range(40):
        (inbox / f"f{i:02}").write_text("0.4")
    service = Service(tmp_path, _config(tmp_path, 1))
    try:
        service.wait_log("ingested")
        assert _most_alive(tmp_path, 1.5) == 1
        # When: the limit is raised to 3 and the service told so
        service.config_path.write_text(_config(tmp_path, 3))
        service.signal(signal.SIGHUP)
        service.wait_log(r"reloaded; limits: stages\[work\]\.concurrency 1 → 3\n")
        # Then: three runs go on at once, and never more; the status file shows the new limit.
        assert _most_alive(tmp_path, 1.5) == 3
        _wait_for(lambda: service.status()["stages"]["work"]["concurrency"] == 3, 10,
                  "the status file kept the old limit")  # fmt: skip
        # When: it is lowered to 1 (and a key that takes a restart changes too)
        service.config_path.write_text(_config(tmp_path, 1, extra='timeout = "1m"'))
        service.signal(signal.SIGHUP)
        service.wait_log(
            r"reloaded; limits: stages\[work\]\.concurrency 3 → 1; changed but not applied "
            r"until a restart: stages\[work\]\.timeout"
        )
        # Then: the runs going on finish, and from then on one runs at a time.
        time.sleep(0.6)
        assert _most_alive(tmp_path, 1.2) == 1
        assert service.stop(20) == 0
    finally:
        service.stop()
    record = (tmp_path / "record").read_text()
    assert "OVERLAP" not in record  # the lock files agree: never more than 3
    assert record.count("start") >= 10


def test_sighup_with_a_broken_config_keeps_the_limits_and_the_service(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    service = Service(tmp_path, _config(tmp_path, 2))
    try:
        _wait_for(lambda: (tmp_path / "state" / "status.json").exists(), 15, service.log)
        service.config_path.write_text(_config(tmp_path, 2).replace("concurrency = 2",
                                                          'concurrency = "many"'))  # fmt: skip
        service.signal(signal.SIGHUP)
        match = service.wait_log(r"not reloaded, the limits stay as they are; 1 error:\n  (.*)")
        assert match.group(1).startswith("stages[0].concurrency: expected")
        # The service goes on with its limits: two at once.
        for i in range(6):
            (inbox / f"f{i}").write_text("0.5")
        assert _most_alive(tmp_path, 1.5) == 2
        # The status file says so (`orchestrator status` refuses the broken config itself)
        _wait_for(lambda: (service.status().get("reload") or {}).get("errors"), 10, service.log)
        reload = service.status()["reload"]
        assert reload["ok"] is False
        assert reload["errors"][0].startswith("stages[0].concurrency: expected")
        # and `orchestrator status` too, once the file is mended but not yet reloaded
        service.config_path.write_text(_config(tmp_path, 3, extra='timeout = "1m"'))
        assert "the config has 1 error(s), limits unchanged (stages[0].concurrency" in _status(
            service
        )
        # until a good reload
        service.signal(signal.SIGHUP)
        _wait_for(lambda: service.status()["reload"]["ok"], 10, service.log)
        assert service.status()["reload"]["applied"] == ["stages[work].concurrency 2 → 3"]
        shown = _status(service)
        assert "stages[work].concurrency 2 → 3; until a restart: stages[work].timeout" in shown
        assert service.stop(20) == 0
    finally:
        service.stop()


def _status(service: Service) -> str:
    """What `orchestrator status` prints about the service, on one line per row."""
    proc = subprocess.run(
        [PY, "-m", "orchestrator", "status", "-c", str(service.config_path)],
        capture_output=True, text=True, timeout=30, check=True,
        env={**os.environ, "COLUMNS": "300"},
    )  # fmt: skip
    return proc.stdout


def test_sighup_reopens_the_log_file_after_it_was_renamed(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    service = Service(tmp_path, _config(tmp_path, 1, log_file=True))
    log = tmp_path / "logs" / "orchestrator.log"
    try:
        (inbox / "first").write_text("0")
        _wait_for(lambda: log.exists() and "ingested" in log.read_text(), 15, service.log)
        # When: logrotate's way: rename, then SIGHUP
        log.rename(log.with_suffix(".log.1"))
        service.signal(signal.SIGHUP)
        service.wait_log("reloaded; limits: unchanged")
        (inbox / "second").write_text("0")
        _wait_for(lambda: log.exists() and "ingested 1 item" in log.read_text(), 15,
                  f"no new log file; console:\n{service.log}")  # fmt: skip
        assert service.stop(20) == 0
    finally:
        service.stop()
    new = log.read_text()
    assert re.search(r"SIGHUP: log file \S+orchestrator\.log reopened", new)
    assert "draining" in new  # the lines from then on are here
    old = log.with_suffix(".log.1").read_text()
    assert "draining" not in old
    assert "run started" not in new  # INFO: no DEBUG lines
    assert oct(log.stat().st_mode & 0o777) == "0o600"
    assert oct(log.parent.stat().st_mode & 0o777) == "0o700"  # made by the service


@pytest.mark.skipif(not os.path.exists("/dev/ptmx"), reason="needs pseudo-terminals")
@pytest.mark.parametrize("nohup", [False, True], ids=["plain", "nohup"])
def test_a_closed_terminal_drains_the_service_unless_nohup_said_otherwise(
    tmp_path: Path, nohup: bool
) -> None:
    # Given: `orchestrator run` started from a terminal (under nohup: SIGHUP ignored), with a
    # run going on
    inbox = tmp_path / "in"
    inbox.mkdir()
    config = tmp_path / "orchestrator.toml"
    config.write_text(_config(tmp_path, 1, log_file=True))
    (inbox / "long").write_text("60")
    terminal = _PseudoTerminal(
        [PY, "-m", "orchestrator", "run", "-c", str(config)], cwd=tmp_path, nohup=nohup
    )
    log = tmp_path / "logs" / "orchestrator.log"
    try:
        _wait_for(lambda: _live(tmp_path) == 1, 20, f"no run started: {terminal.output!r}")
        (stage,) = processes_with_env(f"{STATE_MARKER}={tmp_path / 'state'}")
        # When: the terminal window is closed
        terminal.hang_up()
        if nohup:
            # Then (nohup): the service goes on, its run too, until told to stop.
            _wait_for(lambda: "ignored, as nohup asked" in log.read_text(), 20, "no line")
            time.sleep(0.5)
            assert terminal.proc.poll() is None
            assert os.path.exists(f"/proc/{stage}")
            terminal.proc.send_signal(signal.SIGTERM)
        # Then: the service drains (the run is killed: shutdown_grace is 1 s) and exits 0.
        assert terminal.proc.wait(30) == 0, log.read_text()
    finally:
        terminal.close()
    text = log.read_text()
    assert ("SIGTERM: draining" if nohup else "SIGHUP (the terminal closed): draining") in text
    assert "reloaded" not in text
    assert not os.path.exists(f"/proc/{stage}")
    assert not processes_with_env(f"{STATE_MARKER}={tmp_path / 'state'}")


def _ended(record: Path) -> int:
    """How many runs `locked_stage.py` recorded as ended."""
    if not record.exists():
        return 0
    return sum(line.startswith("end ") for line in record.read_text().splitlines())


def test_reloads_in_a_row_lose_and_repeat_nothing(tmp_path: Path) -> None:
    # Given: 150 items of 20-60 ms through a stage whose limit is changed by a SIGHUP every
    # 0.15 s, at random between 1 and 3 (workers started and retired all along)
    inbox = tmp_path / "in"
    inbox.mkdir()
    rng = random.Random(13)
    names = [f"f{i:03}" for i in range(150)]
    for name in names:
        (inbox / name).write_text(f"{rng.uniform(0.02, 0.06):.3f}")
    service = Service(tmp_path, _config(tmp_path, 2))
    record = tmp_path / "record"
    try:
        _wait_for(lambda: (tmp_path / "state" / "status.json").exists(), 15, service.log)
        reloads = 0
        deadline = time.monotonic() + 60
        while _ended(record) < len(names):
            assert time.monotonic() < deadline, service.log[-3000:]
            service.config_path.write_text(_config(tmp_path, rng.randint(1, 3)))
            service.signal(signal.SIGHUP)
            reloads += 1
            time.sleep(0.15)
        assert service.stop(20) == 0, service.log[-3000:]
    finally:
        service.stop()
    # Then: every item ran exactly once, never more than 3 at a time (the lock files), and
    # every reload was applied or found nothing to change.
    text = record.read_text()
    assert "OVERLAP" not in text
    started = sorted(re.findall(r"^start work \S+ \d+ '(in:f\d+)'", text, re.MULTILINE))
    assert started == [f"in:{name}" for name in names]
    assert reloads > 10
    assert service.log.count("reloaded; limits:") >= reloads - 1  # the last may come late
    assert "Traceback" not in service.log


def test_sighup_applies_a_new_log_level_and_a_new_log_file(tmp_path: Path) -> None:
    inbox = tmp_path / "in"
    inbox.mkdir()
    service = Service(tmp_path, _config(tmp_path, 1, log_file=True))
    first = tmp_path / "logs" / "orchestrator.log"
    try:
        (inbox / "a").write_text("0")
        _wait_for(lambda: first.exists() and "run ok" in first.read_text(), 15, service.log)
        assert "run started" not in first.read_text()  # a DEBUG line
        # When: the config now says DEBUG, into another file
        text = _config(tmp_path, 1).replace(
            "[status]", '[log]\nlevel = "DEBUG"\nfile = "logs/debug.log"\n[status]'
        )
        service.config_path.write_text(text)
        service.signal(signal.SIGHUP)
        service.wait_log(r"reloaded; limits: unchanged; log.level INFO → DEBUG, log.file ")
        (inbox / "b").write_text("0")
        debug = tmp_path / "logs" / "debug.log"
        # Then: the next run's DEBUG lines are in the new file (and on the console), not the old
        _wait_for(lambda: debug.exists() and "run started" in debug.read_text(), 15, service.log)
        assert service.stop(20) == 0
    finally:
        service.stop()
    assert "item='in:b'" in debug.read_text()
    assert "item='in:b'" not in first.read_text()
    assert re.search(r"DEBUG\s+run started.*item='in:b'", service.log)


def _reload_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-m", "orchestrator", "reload", "-c", str(config), *args],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_the_reload_command_signals_the_service_and_shows_its_answer(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.toml"
    slow_status = _config(tmp_path, 1).replace('interval = "0.3s"', 'interval = "10s"')
    config.write_text(slow_status)
    # No service yet: nothing to signal.
    proc = _reload_cli(config)
    assert proc.returncode == 3
    assert "no status file" in proc.stderr
    assert "a changed state_dir or [status] file takes a restart" in proc.stderr
    service = Service(tmp_path, slow_status)
    try:
        _wait_for(lambda: (tmp_path / "state" / "status.json").exists(), 15, service.log)
        # When: the limit is raised and `orchestrator reload` run
        config.write_text(slow_status.replace("concurrency = 1", "concurrency = 2"))
        started = time.monotonic()
        proc = _reload_cli(config)
        # Then: the answer comes from the service, well before its next status write (10 s)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout == "reloaded: stages[work].concurrency 1 → 2\n"
        assert time.monotonic() - started < 8
        answer = json.loads(_reload_cli(config, "--json").stdout)
        assert (answer["ok"], answer["number"], answer["applied"]) == (True, 2, [])
        # A broken config is not sent: the service never hears of it.
        config.write_text(slow_status.replace("concurrency = 1", 'concurrency = "many"'))
        proc = _reload_cli(config)
        assert proc.returncode == 2
        assert "stages[0].concurrency" in proc.stderr
        assert service.log.count("reloaded;") == 2
        # A valid config whose new log file cannot be opened (its folder is a file) is
        # refused whole, with the reason, not reported applied (acceptance, session 15).
        (tmp_path / "not-a-folder").write_text("")
        bad_log = str(tmp_path / "not-a-folder" / "x.log")
        config.write_text(slow_status.replace("concurrency = 1", "concurrency = 3")
                          + f"[log]\nfile = {json.dumps(bad_log)}\n")  # fmt: skip
        proc = _reload_cli(config)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert f"log.file: cannot open {bad_log!r}" in proc.stderr
        assert "the service kept its config as it was" in proc.stderr
        assert service.status()["stages"]["work"]["concurrency"] == 2
        # A folder given as the log file: refused the same (it was accepted, every line then
        # a traceback, and the folder made 0600), the folder untouched.
        folder = tmp_path / "a-folder"
        folder.mkdir(mode=0o755)
        config.write_text(slow_status.replace("concurrency = 1", "concurrency = 3")
                          + f"[log]\nfile = {json.dumps(str(folder))}\n")  # fmt: skip
        proc = _reload_cli(config)
        assert proc.returncode == 1, (proc.stdout, proc.stderr)
        assert "Is a directory" in proc.stderr
        assert oct(folder.stat().st_mode & 0o777) == "0o755"
        assert "Logging error" not in service.log
        config.write_text(slow_status)
        assert service.stop(20) == 0
    finally:
        service.stop()
    # Stopped: nothing to signal (its pid may be another process's by now).
    proc = _reload_cli(config)
    assert proc.returncode == 3
    assert "stopped" in proc.stderr

"""`reap` against real processes marked as a dead instance's runs (their environment)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from typing import TYPE_CHECKING

from orchestrator.reaper import STATE_MARKER, reap

if TYPE_CHECKING:
    from pathlib import Path

OBEYS = "import time; print('up', flush=True); time.sleep(60)"
IGNORES = (
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "print('up', flush=True); time.sleep(60)"
)


def _leftover(state_dir: Path, code: str, run: int) -> subprocess.Popen[str]:
    env = {**os.environ, STATE_MARKER: str(state_dir), "ORCH_RUN": str(run),
           "ORCH_ITEM": f"in:{run}", "ORCH_STAGE": "s", "ORCH_ATTEMPT": "1"}  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True,
        start_new_session=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline() == "up\n"  # its SIGTERM handler is in place
    return proc


def test_reap_ends_leftovers_and_counts_each_process_once(tmp_path: Path) -> None:
    # Found in session 6: the start-up warning said "ended 3 process(es) ... (4 needed
    # SIGKILL)": a process found again while it died of our SIGKILL was counted again.
    procs = [_leftover(tmp_path, OBEYS, 1), _leftover(tmp_path, IGNORES, 2),
             _leftover(tmp_path, IGNORES, 3)]  # fmt: skip
    try:
        started = time.monotonic()
        report = reap(str(tmp_path), [(p.pid, None) for p in procs], grace=0.5)
        assert time.monotonic() - started < 10
        assert (report.found, report.terminated, report.killed) == (3, 1, 2)
        assert report.survivors == ()
        assert [r.run for r in report.runs] == [1, 2, 3]
        for proc in procs:
            proc.wait(timeout=5)
        assert [p.returncode for p in procs] == [-15, -9, -9]  # observed by the OS, not by us
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()


GROUP = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    "child = subprocess.Popen([sys.executable, '-c', "
    "'import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
    'print("up", flush=True); time.sleep(60)\']); time.sleep(60)'
)


def _live_members(pgid: int) -> list[int]:
    from orchestrator.reaper import proc_stat

    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = proc_stat(int(name))
            if stat is not None and stat[1] == pgid and stat[0] != "Z":
                members.append(int(name))
    return members


def test_a_group_that_ignores_sigterm_is_killed_and_counted_once(tmp_path: Path) -> None:
    from orchestrator.reaper import proc_stat

    leader = _leftover(tmp_path, GROUP, 7)  # "up" comes from its child: both ignore SIGTERM
    try:
        stat = proc_stat(leader.pid)
        assert stat is not None
        report = reap(str(tmp_path), [(leader.pid, stat[2])], grace=0.3)
        assert (report.found, report.terminated, report.killed) == (2, 0, 2), report
        assert report.survivors == ()
        leader.wait(timeout=5)
        assert leader.returncode == -9
        # Nothing of the group is left running (zombies wait for init to reap them).
        deadline = time.monotonic() + 5
        while _live_members(leader.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _live_members(leader.pid) == []
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, 9)
            leader.wait()
        if leader.stdout is not None:
            leader.stdout.close()

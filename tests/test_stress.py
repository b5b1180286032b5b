"""`orchestrator stress` end to end: it proves the invariants -- and it can fail."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest

from orchestrator.stress import StressOptions, _synthetic_config, run_stress

if TYPE_CHECKING:
    from pathlib import Path

#: Every fault kind, often enough to show up in a CI-sized run.
ALL_FAULTS = (
    "fail=0.08,hang=0.03,silent=0.03,ignore-term=0.03,orphan=0.05,flood=0.03,signal=0.05,"
    "garbage=0.05"
)


@pytest.mark.timeout(120)
def test_stress_with_kills_freezes_and_every_fault_holds_every_invariant(tmp_path: Path) -> None:
    # Given/When: 40 items through the synthetic pipeline with every fault kind, the service
    # SIGKILLed every 2 s, frozen every 4 s and reloaded with a new store limit every 0.7 s.
    report = run_stress(StressOptions(
        items=40, duration=40, faults=ALL_FAULTS, kill_every=2.0, freeze_every=4.0,
        freeze_for=0.5, reload_every=0.7, workdir=tmp_path,
    ))  # fmt: skip

    # Then: every invariant held, and the faults and kills really happened.
    assert report["ok"], report["invariants"]
    assert report["kills"] >= 3
    assert report["restarts"] == report["kills"]
    assert report["items"]["generated"] == 40
    assert sum(report["items"]["states"].values()) == 40
    assert len(set(report["faults"]) - {"ok"}) >= 5, report["faults"]
    assert report["reloads"] >= 5
    assert set(report["invariants"]) == {
        "limits", "accounted", "single_terminal", "no_survivors", "status_file", "health",
        "clean_exit", "reloads",
    }  # fmt: skip


@pytest.mark.timeout(120)
def test_a_broken_setup_that_overlaps_exclusive_stages_is_caught(tmp_path: Path) -> None:
    # Given: a second service on its OWN state folder running the same exclusive stage programs
    # (same lock slots, same audit log) -- two extracts can now really run at once.
    config = _synthetic_config(tmp_path, "")
    second = tmp_path / "second.toml"
    second.write_text(
        config.read_text()
        .replace('state_dir = "state"', 'state_dir = "state2"')
        .replace('path = "inbox"', 'path = "inbox2"')
    )
    (tmp_path / "inbox2").mkdir()
    for i in range(80):
        (tmp_path / "inbox2" / f"other-{i}").write_text("x")
    rogue = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-c", str(second)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        # When: the stress tool drives the first pipeline.
        report = run_stress(StressOptions(config=config, items=80, duration=30,
                                          workdir=tmp_path))  # fmt: skip
    finally:
        rogue.send_signal(signal.SIGTERM)
        rogue.wait(timeout=30)

    # Then: the overlap is caught from the OS and the report says the run failed.
    assert not report["ok"]
    assert not report["invariants"]["limits"]["held"]
    assert "flock overlaps in the audit log: 0" not in report["invariants"]["limits"]["evidence"]


def test_stress_command_line_json_and_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import main

    code = main(["stress", "--items", "6", "--duration", "20s", "--faults", "fail=0.2", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert code == 0
    assert report["ok"]
    assert report["items"]["generated"] == 6
    assert {"ok", "invariants", "items", "restarts", "kills", "faults", "throughput", "latency",
            "retries"} <= set(report)  # fmt: skip


def test_stress_refuses_bad_options(capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.cli import main

    assert main(["stress", "--faults", "explode=1"]) == 2
    assert "unknown fault 'explode'" in capsys.readouterr().err
    assert main(["stress", "--duration", "soon"]) == 2


def test_a_stopped_stress_run_stops_the_frozen_service_it_started(tmp_path: Path) -> None:
    # Given: a stress run whose service is frozen for long stretches
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "stress", "--items", "50", "--duration", "60s",
         "--freeze-every", "1s", "--freeze-for", "20s"],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    service = None
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # "stress: service pid N; state …"
            if "service pid" in line:
                service = int(line.split("service pid ")[1].split(";")[0])
                break
        assert service is not None
        time.sleep(2)  # inside the freeze

        # When: the tool is told to stop
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)

        # Then: it stopped its service (woken from the freeze) before exiting 130
        assert proc.returncode == 130, err
        assert "the service it started was stopped" in err
        assert not os.path.exists(f"/proc/{service}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if service is not None and os.path.exists(f"/proc/{service}"):
            os.kill(service, signal.SIGKILL)

"""`orchestrator stress` end to end: it proves the invariants -- and it can fail."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from typing import TYPE_CHECKING, Any

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
        "limits", "processed", "accounted", "single_terminal", "no_survivors", "status_file",
        "health", "clean_exit", "event_loop", "reloads", "recorded",
    }  # fmt: skip


def test_runs_missing_from_the_store_or_sharing_an_id_are_caught() -> None:
    from orchestrator.stress import _recorded_verdict

    started = {1: [("in:a", "s", 1)], 2: [("in:b", "s", 1), ("in:c", "s", 1)], 3: [("in:d", "s", 2)],
               4: [("in:e", "s", 1)]}  # fmt: skip
    recorded = {1: ("in:a", "s", 1), 2: ("in:b", "s", 1), 4: ("in:f", "s", 1)}
    verdict = _recorded_verdict(started, recorded)
    assert not verdict["held"]
    assert verdict["evidence"] == (
        "1 run id(s) given to more than one run: [(2, [('in:b', 's', 1), ('in:c', 's', 1)])]; "
        "1 run(s) not in the store: [(3, ('in:d', 's', 2))]; "
        "1 run id(s) the store gives to another run: [(4, (('in:e', 's', 1), ('in:f', 's', 1)))]"
    )
    assert _recorded_verdict({1: [("in:a", "s", 1)]}, recorded)["held"]


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
    # Its own folder is removed when every invariant held: the report names no file in it.
    assert [report["workdir"], report["service_log"], report["config"]] == [None, None, None]


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


def _user_pipeline(
    folder: Path, command: list[str], *, extra: str = "", stage_extra: str = "",
    timeout: str = "5s",
) -> Path:  # fmt: skip
    """A user's config in ``folder``: a directory source and a JSONL source through stages a
    and b (``command``), each with an input already there, done inputs moved away."""
    (folder / "inbox").mkdir(parents=True)
    (folder / "inbox" / "mine.txt").write_text("the user's own input\n")
    (folder / "feed").mkdir()
    (folder / "feed" / "records.jsonl").write_text('{"id": "mine", "n": 0}\n')
    stage = (f"concurrency = 2\ntimeout = \"{timeout}\"\ngrace_period = \"200ms\"\n"
             f"command = {json.dumps(command)}\n{stage_extra}")  # fmt: skip
    path = folder / "pipeline.toml"
    path.write_text(
        'state_dir = "state"\nshutdown_grace = "2s"\nmax_interruptions = 1000\n'
        '[http]\nlisten = "127.0.0.1:0"\n[status]\ninterval = "300ms"\n'
        f'[log]\nlevel = "WARNING"\nfile = "service.log"\n{extra}'
        '[[sources]]\nname = "files"\ntype = "directory"\npath = "inbox"\nsettle = "0s"\n'
        'poll_interval = "200ms"\nroute = ["a", "b"]\non_done = "move:done"\n'
        '[[sources]]\nname = "records"\ntype = "jsonl"\npath = "feed/records.jsonl"\n'
        'poll_interval = "200ms"\nroute = ["a", "b"]\n'
        f'[[stages]]\nname = "a"\n{stage}[[stages]]\nname = "b"\n{stage}'
    )
    return path


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}  # fmt: skip


FAKE = [sys.executable, "-m", "orchestrator.fakestage", "--duration", "0.02:0.05"]


@pytest.mark.timeout(60)
def test_a_users_config_runs_on_a_copy_that_leaves_their_files_alone(tmp_path: Path) -> None:
    # Given: a user's pipeline whose folder holds inputs, a records file, a log file setting and
    # a move of done inputs -- all of it theirs.
    user = _user_pipeline(tmp_path / "user", FAKE)
    before = _tree(tmp_path / "user")

    # When: it is stressed twice in a row
    reports = [
        run_stress(StressOptions(config=user, items=6, duration=12, workdir=tmp_path / f"w{i}"))
        for i in (1, 2)
    ]

    # Then: both runs held (the second is not tripped by the first one's state, nor by the
    # inputs that were already there), and not one file of the user's folder was written,
    # moved, added or deleted; the copy's own folders got the load.
    for i, report in enumerate(reports, 1):
        assert report["ok"], report["invariants"]
        assert report["items"]["generated"] == 12
        assert report["user_config"] == str(user)
        assert report["config"].startswith(str(tmp_path / f"w{i}"))
    assert _tree(tmp_path / "user") == before
    assert len(list((tmp_path / "w1" / "moved" / "files" / "done").iterdir())) == 6


@pytest.mark.timeout(60)
def test_a_run_where_nothing_reaches_a_terminal_state_fails(tmp_path: Path) -> None:
    # Given: stages that never end a run within the stress run (no timeout reached)
    user = _user_pipeline(tmp_path / "user", ["sleep", "30"], timeout="60s")

    # When
    report = run_stress(StressOptions(config=user, items=3, duration=6, workdir=tmp_path / "w"))

    # Then: the other invariants hold of such an idle service, but the verdict is a failure
    processed = report["invariants"]["processed"]
    assert not report["ok"]
    assert not processed["held"]
    assert processed["evidence"].startswith("0 of 6 generated item(s) reached a terminal state")


@pytest.mark.timeout(60)
def test_a_pool_limit_exceeded_is_caught(tmp_path: Path) -> None:
    # Given: stages a and b (2 each) sharing a pool of 1, whose runs each start a helper
    # process group of their own (setsid) that lives shorter than the run: every stage stays
    # within 2 live process groups, the pool does not stay within 1.
    user = _user_pipeline(
        tmp_path / "user", ["sh", "-c", "setsid sleep 0.2 & sleep 0.4"],
        extra="[pools]\ngpu = 1\n", stage_extra='pools = ["gpu"]\n',
    )  # fmt: skip

    # When
    report = run_stress(StressOptions(config=user, items=3, duration=10, workdir=tmp_path / "w"))

    # Then: the limits invariant failed on the pool
    limits = report["invariants"]["limits"]
    assert not limits["held"], limits
    assert "per pool {'gpu': 2} (limits {'gpu': 1})" in limits["evidence"]
    assert "per stage {'a': 2, 'b': 2}" in limits["evidence"]


@pytest.mark.timeout(60)
def test_refused_reloads_fail_the_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given: a reload that writes a config the service must refuse (a concurrency of 0)
    import orchestrator.stress

    def broken(data: dict[str, Any], bounds: dict[str, int], draw: object) -> None:
        for stage in data["stages"]:
            stage["concurrency"] = 0

    monkeypatch.setattr(orchestrator.stress, "_draw_limits", broken)
    user = _user_pipeline(tmp_path / "user", FAKE)

    # When
    report = run_stress(StressOptions(config=user, items=4, duration=8, reload_every=1.5,
                                      workdir=tmp_path / "w"))  # fmt: skip

    # Then: the refusals are reported (with the service's reason) and the verdict fails
    reloads = report["invariants"]["reloads"]
    assert not report["ok"]
    assert not reloads["held"]
    assert "0 reload(s) applied" in reloads["evidence"]
    assert "concurrency" in reloads["evidence"].split("refused with:")[1]


@pytest.mark.timeout(60)
def test_a_users_limits_are_drawn_anew_at_each_reload(tmp_path: Path) -> None:
    user = _user_pipeline(tmp_path / "user", FAKE, extra="[pools]\ngpu = 3\n",
                          stage_extra='pools = ["gpu"]\n')  # fmt: skip

    report = run_stress(StressOptions(config=user, items=4, duration=8, reload_every=1,
                                      workdir=tmp_path / "w"))  # fmt: skip

    assert report["ok"], report["invariants"]
    reloads = report["invariants"]["reloads"]["evidence"]
    assert "0 refused" in reloads
    assert "never changed" not in reloads  # a, b and the pool all showed another limit


WATCHDOG = '[watchdog]\nloop_stall_warn = "300ms"\nloop_stall_timeout = "30s"\n'


@pytest.mark.timeout(60)
def test_a_blocked_event_loop_fails_the_verdict(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: a service whose event loop is blocked for 1.5 s, a second after it started
    monkeypatch.setenv("ORCH_TEST_BLOCK_LOOP", "1.5@1")
    user = _user_pipeline(tmp_path / "user", FAKE, extra=WATCHDOG)

    # When
    report = run_stress(StressOptions(config=user, items=4, duration=8, workdir=tmp_path / "w"))

    # Then
    loop = report["invariants"]["event_loop"]
    assert not report["ok"]
    assert not loop["held"]
    assert "the service reported its event loop blocked: 1." in loop["evidence"]


@pytest.mark.timeout(60)
def test_the_tools_own_freezes_are_not_taken_for_a_blocked_loop(tmp_path: Path) -> None:
    # Given: the same watchful service, frozen (SIGSTOP) for 1.5 s every 2 s
    user = _user_pipeline(tmp_path / "user", FAKE, extra=WATCHDOG)

    # When
    report = run_stress(StressOptions(config=user, items=4, duration=10, freeze_every=2,
                                      freeze_for=1.5, workdir=tmp_path / "w"))  # fmt: skip

    # Then
    assert report["freezes"] >= 1
    assert report["ok"], report["invariants"]
    assert report["invariants"]["event_loop"]["held"]


def test_a_freeze_the_service_cannot_live_through_is_refused_up_front(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestrator.cli import main

    # Given: a service whose faulthandler ends it 12 s after its heartbeat last ran
    user = _user_pipeline(tmp_path / "user", FAKE,
                          extra='[watchdog]\nloop_stall_warn = "1s"\nloop_stall_timeout = "2s"\n')  # fmt: skip

    # When/Then: a 15 s freeze is refused before anything starts, with the reason
    args = ["stress", "-c", str(user), "--freeze-every", "3s", "--duration", "20s"]
    assert main([*args, "--freeze-for", "15s"]) == 2
    err = capsys.readouterr().err
    assert "--freeze-for 15s is too long" in err
    assert "freeze it for less than 11s" in err
    assert not (tmp_path / "user" / "state").exists()


def test_the_human_report_shows_names_as_text_not_markup(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Found by a fix helper (session 17): evidence and paths were printed with rich markup on,
    # so a "[red]" in a file name or path coloured the report and vanished from it.
    from orchestrator.cli import _print_stress

    report = {
        "ok": False, "items": {}, "runs": {}, "retries": 0, "kills": 0, "restarts": 0,
        "freezes": 0, "reloads": 0, "faults": {}, "throughput": 0, "elapsed_seconds": 1,
        "latency": {}, "user_config": "/srv/[bold]c.toml", "config": "/tmp/w/c.toml",
        "workdir": "/tmp/[red]w",
        "invariants": {"recorded": {"held": False, "evidence": "1 run(s) not in the store: "
                                    "[(3, ('in:[red]x[/]', 's', 1))]"}},
    }  # fmt: skip
    _print_stress(report)
    out = capsys.readouterr().out
    assert "in:[red]x[/]" in out
    assert "/srv/[bold]c.toml ran as a copy" in out
    assert "evidence kept in /tmp/[red]w" in out

"""Housekeeping: run logs pruned by age and by a disk budget, on real files and a real service."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
import time
import tomllib
from pathlib import Path

import pytest
from servicekit import PY, Service, service_config

from orchestrator.config import parse_config
from orchestrator.errors import ConfigError
from orchestrator.housekeeping import prune_run_logs

DAY = 86400.0
NOW = 1_900_000_000.0


def _log(folder: Path, name: str, size: int, age: float) -> Path:
    path = folder / name
    path.write_bytes(b"x" * size)
    os.utime(path, (NOW - age, NOW - age))
    return path


def _usage(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def _keep_none(_run_id: int) -> bool:
    return False


def test_logs_past_the_age_go_and_nothing_but_run_logs_is_touched(tmp_path: Path) -> None:
    # Given: run logs of various ages, and things in the folder that are not run logs, all old
    old = [_log(tmp_path, f"{i}.log", 100, 8 * DAY + i) for i in range(1, 4)]
    young = [_log(tmp_path, f"{i}.log", 100, 6 * DAY) for i in range(4, 6)]
    others = [_log(tmp_path, name, 100, 30 * DAY) for name in ("notes.txt", "7.log.tmp", "x.log")]
    (tmp_path / "9.log").mkdir()
    target = _log(tmp_path.parent, "outside.log", 100, 30 * DAY)
    link = tmp_path / "8.log"
    link.symlink_to(target)
    os.utime(link, (NOW - 30 * DAY, NOW - 30 * DAY), follow_symlinks=False)

    # When: a pass with a week's age limit and no size limit
    report = prune_run_logs(str(tmp_path), max_age=7 * DAY, max_size=None, keep=_keep_none, now=NOW)

    # Then: exactly the old run logs are gone
    assert [p.exists() for p in old] == [False] * 3
    assert all(p.exists() for p in young + others + [tmp_path / "9.log", target])
    assert link.is_symlink()
    assert (report.aged, report.over_budget, report.error) == (3, 0, None)
    assert report.freed == 3 * _usage(young[0])
    assert report.left == sum(_usage(p) for p in young)


def test_the_oldest_logs_go_until_the_rest_fit_the_budget(tmp_path: Path) -> None:
    # Given: ten logs of 10 KB, 1 to 10 hours old (log 1 the newest)
    logs = [_log(tmp_path, f"{i}.log", 10_000, i * 3600) for i in range(1, 11)]
    each = _usage(logs[0])
    assert each >= 10_000

    # When: the budget is four logs' disk space (plus a little: not five)
    report = prune_run_logs(
        str(tmp_path), max_age=7 * DAY, max_size=4 * each + each // 2, keep=_keep_none, now=NOW
    )

    # Then: the six oldest are gone, the four newest kept
    assert [p.exists() for p in logs] == [True] * 4 + [False] * 6
    assert (report.aged, report.over_budget) == (0, 6)
    assert (report.freed, report.left) == (6 * each, 4 * each)


def test_kept_runs_stay_whatever_their_age_and_size_and_count_against_the_budget(
    tmp_path: Path,
) -> None:
    # Given: old big logs of runs that are going on (1, 2) and others (3, 4, 5)
    logs = {i: _log(tmp_path, f"{i}.log", 20_000, (10 - i) * DAY) for i in range(1, 6)}
    each = _usage(logs[1])

    # When: a pass with a budget smaller than the kept logs alone, and no age limit
    report = prune_run_logs(
        str(tmp_path), max_age=None, max_size=each, keep=lambda run_id: run_id <= 2, now=NOW
    )

    # Then: the kept ones are there; every other one went to make room
    assert {i for i, p in logs.items() if p.exists()} == {1, 2}
    assert (report.aged, report.over_budget, report.left) == (0, 3, 2 * each)


def test_a_missing_folder_is_nothing_to_do(tmp_path: Path) -> None:
    report = prune_run_logs(str(tmp_path / "runs"), max_age=1.0, max_size=1, keep=_keep_none)
    assert (report.removed, report.freed, report.error) == (0, 0, None)


def _housekeeping(toml: str) -> object:
    data = tomllib.loads('[[stages]]\nname = "s"\ncommand = ["true"]\n' + toml)
    return parse_config(data, base_dir=Path()).housekeeping


def test_config_defaults_switches_and_errors() -> None:
    default = _housekeeping("")
    assert (default.interval, default.run_logs_max_age, default.run_logs_max_size) == (  # type: ignore[attr-defined]
        600.0, 7 * DAY, 256_000_000,
    )  # fmt: skip
    assert default.items_max_age is None  # type: ignore[attr-defined]
    off = _housekeeping(
        '[housekeeping]\ninterval = "1m"\nrun_logs_max_age = false\nrun_logs_max_size = false\n'
        "items_max_age = false\n"
    )
    assert (off.interval, off.run_logs_max_age, off.run_logs_max_size) == (60.0, None, None)  # type: ignore[attr-defined]
    assert off.items_max_age is None  # type: ignore[attr-defined]
    assert _housekeeping('[housekeeping]\nitems_max_age = "30d"\n').items_max_age == 30 * DAY  # type: ignore[attr-defined]

    with pytest.raises(ConfigError) as caught:
        _housekeeping(
            '[housekeeping]\ninterval = 0\nrun_logs_max_age = "soon"\nrun_logs_max_size = 0\n'
            "items_max_age = 0\nrun_log_max_size = 1\n"
        )
    assert caught.value.errors == [
        "housekeeping.interval: must be > 0, got 0s",
        'housekeeping.run_logs_max_age: expected a duration like "30s", got "soon"',
        "housekeeping.run_logs_max_size: must be more than 0 bytes, got 0",
        "housekeeping.items_max_age: must be > 0, got 0s",
        'housekeeping.run_log_max_size: unknown key (did you mean "run_logs_max_size"?)',
    ]


def _runs(state: Path) -> dict[int, Path]:
    folder = state / "runs"
    return {int(p.stem): p for p in folder.glob("*.log")} if folder.exists() else {}


def _pruning_service(tmp_path: Path, housekeeping: str, command: str) -> Service:
    """A service with a directory source ``in`` and one stage ``work`` at concurrency 2
    running ``command`` (a TOML array), pruning its run logs every 0.2 s as told."""
    return Service(tmp_path, service_config(f"""
        [housekeeping]
        interval = "0.2s"
        {housekeeping}
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = ["work"]
        [[stages]]
        name = "work"
        command = {command}
        concurrency = 2
        """, listen="false"))  # fmt: skip


def test_a_service_keeps_its_run_logs_within_the_budget_but_never_a_running_ones(
    tmp_path: Path,
) -> None:
    # Given: a service pruning every 0.2 s to a budget smaller than one log; each run prints
    # 300 KB (more than the runner buffers: its log is on disk while it runs), then sleeps as
    # long as its file says.
    service = _pruning_service(
        tmp_path, 'run_logs_max_size = "4 KB"',
        f"""["{PY}", "-c", "import sys, time; print('x' * 300_000, flush=True); time.sleep(float(open(sys.argv[1]).read()))", "{{path}}"]""",
    )  # fmt: skip
    state = tmp_path / "state"
    try:
        (tmp_path / "in" / "slow").write_text("3")
        deadline = time.monotonic() + 15
        while not ((state / "status.json").exists() and service.status()["running"]):
            assert time.monotonic() < deadline, service.log
            time.sleep(0.05)
        for i in range(6):
            (tmp_path / "in" / f"fast{i}").write_text("0")

        # When: the fast runs end and their logs go while the slow one runs
        service.wait_log(r"housekeeping: removed \d+ run log\(s\).*beyond the 4 KB budget")
        deadline = time.monotonic() + 20
        slow_log_seen = 0
        while time.monotonic() < deadline:
            # (The status file is up to 0.3 s old: a run it shows 0.5-2 s into its 3 s sleep
            # is still going.)
            slow = [r for r in service.status()["running"] if r["item"] == "in:slow"]
            logs = _runs(state)
            if slow and 0.5 < slow[0]["age"] < 2:
                # Then: the running run's log is never removed, whatever the budget says
                assert slow[0]["run"] in logs, (slow, logs)
                slow_log_seen += 1
            elif not slow and service.status()["stages"]["work"]["done"] == 7:
                break
            time.sleep(0.05)
        assert slow_log_seen > 10

        # Then: once nothing runs, every log goes (one is over the budget), and `show` says so
        deadline = time.monotonic() + 10
        while _runs(state) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _runs(state) == {}
        shown = subprocess.run(
            [PY, "-m", "orchestrator", "show", "-c", str(service.config_path), "in:slow"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert "no longer on disk" in shown
        assert "xxxxxxxx" in shown  # the output's tail is still in the store
        as_json = subprocess.run(
            [PY, "-m", "orchestrator", "show", "-c", str(service.config_path), "in:slow",
             "--json"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout  # fmt: skip
        assert json.loads(as_json)["runs"][0]["log_path"].endswith(".log")
    finally:
        code = service.stop()
    assert code == 0, service.log


def test_a_service_removes_run_logs_past_their_age(tmp_path: Path) -> None:
    # Given: a service keeping run logs 1 s, and items whose runs print
    service = _pruning_service(
        tmp_path, 'run_logs_max_age = "1s"\nrun_logs_max_size = false',
        f"""["{PY}", "-c", "print('hello')"]""",
    )  # fmt: skip
    state = tmp_path / "state"
    try:
        for i in range(3):
            (tmp_path / "in" / f"f{i}").write_text("")
        # When: they ran: their logs are there at first
        deadline = time.monotonic() + 15
        while len(_runs(state)) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        ended = time.monotonic()
        assert len(_runs(state)) == 3, service.log
        # Then: gone a little over a second later, with a line saying why
        service.wait_log(r"housekeeping: removed \d run log\(s\).*older than 1s")
        while _runs(state) and time.monotonic() < ended + 5:
            time.sleep(0.05)
        assert _runs(state) == {}
        assert time.monotonic() - ended > 0.8
    finally:
        code = service.stop()
    assert code == 0, service.log


def _item_ids(config: Path) -> list[str]:
    out = subprocess.run(
        [PY, "-m", "orchestrator", "items", "-c", str(config), "--json"],
        capture_output=True, text=True, timeout=30, check=True,
    ).stdout  # fmt: skip
    return sorted(item["id"] for item in json.loads(out))


def test_a_service_purges_ended_items_past_items_max_age(tmp_path: Path) -> None:
    # Given: a service purging items unchanged for 1 s, whose source deletes each done file
    service = Service(tmp_path, service_config("""
        [housekeeping]
        interval = "0.2s"
        items_max_age = "1s"
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = ["work"]
        on_done = "delete"
        [[stages]]
        name = "work"
        command = ["true"]
        concurrency = 1  # runs start in the items' order: the newest item has the newest run
        """, listen="false"))  # fmt: skip
    try:
        for i in range(5):
            (tmp_path / "in" / f"f{i}").write_text("")
        deadline = time.monotonic() + 15
        while os.listdir(tmp_path / "in") and time.monotonic() < deadline:
            time.sleep(0.02)
        ended = time.monotonic()
        assert len(_item_ids(service.config_path)) == 5
        # Then: a little over a second later they are purged -- all but the newest, whose
        # number must not be reused -- with a line saying so
        service.wait_log(r"housekeeping: purged 4 item\(s\) unchanged for 1s \(4 done\) with 4 "
                         r"run\(s\)")  # fmt: skip
        assert time.monotonic() - ended > 0.8
        assert _item_ids(service.config_path) == ["in:f4"]
        # And the service goes on: a file dropped again under a purged name is a new item
        (tmp_path / "in" / "f0").write_text("")
        service.wait_log(r"run ok .*\[item='in:f0'.*\n(.|\n)*run ok .*\[item='in:f0'")
    finally:
        code = service.stop()
    assert code == 0, service.log


def test_a_batch_purges_older_items_but_never_those_it_ended(tmp_path: Path) -> None:
    config = tmp_path / "orchestrator.toml"
    config.write_text(textwrap.dedent(f"""
        state_dir = "state"
        [http]
        listen = false
        [housekeeping]
        interval = "0.2s"
        items_max_age = "1s"
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        route = ["work"]
        on_done = "move:done"
        [[stages]]
        name = "work"
        command = ["{PY}", "-c", "import time; time.sleep(0.3)"]
        """))  # fmt: skip
    inbox = tmp_path / "in"
    inbox.mkdir()

    def batch() -> dict[str, object]:
        proc = subprocess.run(
            [PY, "-m", "orchestrator", "batch", "-c", str(config), "--json", "--no-progress"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)  # type: ignore[no-any-return]

    for name in ("a", "b", "c"):
        (inbox / name).write_text("")
    first = batch()
    assert first["states"] == {"done": 3}
    time.sleep(1.2)
    # When: a second batch, of 6 items at 0.3 s each (longer than items_max_age, with
    # housekeeping passes all along)
    for i in range(6):
        (inbox / f"n{i}").write_text("")
    second = batch()
    # Then: the first batch's items went (the newest too, once this batch's were newer), this
    # batch's stayed for its summary
    assert second["states"] == {"done": 6}
    assert _item_ids(config) == [f"in:n{i}" for i in range(6)]


def test_a_full_disk_at_start_loses_only_the_oldest_logs_of_ended_runs(disk: Path) -> None:
    # Found by an acceptance tester (session 17): run logs filled the state disk, and every
    # restart failed before housekeeping ran. At start, logs of ended runs make room; never the
    # log of a run the store holds open (a dead instance's: its output is only there) nor of one
    # it never recorded (its id must not be handed out again).
    from conftest import fill

    from orchestrator.housekeeping import free_space_at_start
    from orchestrator.runner import Outcome, RunResult
    from orchestrator.store import ItemState, NewItem, Transition, connect
    from orchestrator.store.sqlite import op_finish_run, op_ingest, op_start_run

    # Given: ended runs 1 and 3, run 2 left open, and a log of run 9 the store never recorded;
    # the open and the unrecorded runs' logs are the oldest
    state = disk / "state"
    config = parse_config(
        {"state_dir": str(state), "sources": [{"name": "in", "type": "jsonl", "path": "x",
         "id_field": "id", "route": ["s"]}], "stages": [{"name": "s", "command": ["true"]}]},
        base_dir=disk,
    )  # fmt: skip
    conn = connect(config.db_path)  # type: ignore[arg-type]
    try:
        items = op_ingest(conn, [NewItem(id=f"in:{k}", source="in", key=k, route=("s",))
                                 for k in "abc"])  # fmt: skip
        for item in items:
            claim = op_start_run(conn, item, "s", 0.0, "inst")
            assert claim is not None
            if item.key != "b":
                result = RunResult(outcome=Outcome.OK, exit_code=0, signal=None, pid=1,
                                   duration=0.1, tail="", reason="exit 0")  # fmt: skip
                op_finish_run(conn, run_id=claim[0], item=item, result=result, log_path=None,
                              transition=Transition(state=ItemState.DONE, stage_index=1,
                                                    attempts=0))  # fmt: skip
    finally:
        conn.close()
    runs = state / "runs"
    runs.mkdir()
    now = time.time()
    for run, age in ((9, 40), (2, 30), (1, 20), (3, 10)):
        log = runs / f"{run}.log"
        log.write_bytes(b"x" * 150_000)
        os.utime(log, (now - age, now - age))
    fill(disk)

    # When: a service starts
    report = free_space_at_start(config)

    # Then: the oldest ended run's log went, which made room enough; the rest stay
    assert report is not None
    assert (report.for_room, report.error) == (1, None)
    assert sorted(p.name for p in runs.iterdir()) == ["2.log", "3.log", "9.log"]
    assert free_space_at_start(config) is None  # no longer full

"""The watchdog: a blocked loop named and ended, pipeline stalls noticed -- real time, real processes."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from typing import TYPE_CHECKING

import trio
from conftest import PY, pids_alive
from servicekit import (
    DEFAULT_PIPELINE,
    Service,
    aget,
    captured_logs,
    service_config,
    wait_logged,
)

from orchestrator import cli
from orchestrator.runner import Outcome, RunResult
from orchestrator.store.records import ItemState, NewItem, Transition
from orchestrator.store.sqlite import open_sqlite_store
from orchestrator.supervisor import serve
from orchestrator.watchdog import EXIT_LOOP_STALLED, Watchdog, format_task_tree
from orchestrator.workers import Engine, RunningRun

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from orchestrator.config import Config

BLOCKED = "test-hook:block-loop"


def test_exit_code_is_distinct_and_documented() -> None:
    assert EXIT_LOOP_STALLED == cli.EXIT_LOOP_STALLED == 70
    codes = {v for k, v in vars(cli).items() if k.startswith("EXIT_") and k != "EXIT_LOOP_STALLED"}
    assert EXIT_LOOP_STALLED not in codes


def test_blocked_loop_is_named_then_the_process_exits_70(tmp_path: Path) -> None:
    # Given: a service running a long stage, whose loop a test hook blocks for good at 1.5 s.
    config = service_config(DEFAULT_PIPELINE + """
        [watchdog]
        loop_stall_warn = "0.3s"
        loop_stall_timeout = "1s"
        """)  # fmt: skip
    service = Service(tmp_path, config, env={"ORCH_TEST_BLOCK_LOOP": "60@1.5"})
    try:
        service.wait_log("listening")
        (tmp_path / "in" / "long").write_text("60")
        deadline = time.monotonic() + 10
        while True:  # the run's pid, as the status file shows it
            try:
                running = service.status()["running"]
            except (OSError, ValueError):
                running = []
            if running and running[0]["pid"]:
                run_pid = running[0]["pid"]
                break
            assert time.monotonic() < deadline, service.log
            time.sleep(0.05)

        # When: the loop stays blocked past loop_stall_timeout
        code = service.wait(timeout=15)
    finally:
        service.stop()

    # Then: the blocking task was named with its stack, then every thread's stack was logged,
    # the run's process group was killed, and the process exited with the documented code.
    log = service.log
    assert code == EXIT_LOOP_STALLED, log
    warn = re.search(rf"WARNING +event loop blocked for [\d.]+s by task '{BLOCKED}'; its stack:\n"
                     r"(.*\n){1,4}.*time\.sleep\(float\(seconds\)\)", log)  # fmt: skip
    assert warn, log
    assert re.search(rf"CRITICAL event loop blocked for [\d.]+s \(loop_stall_timeout 1s\) by task"
                     rf" '{BLOCKED}': exiting with status 70", log), log  # fmt: skip
    assert "thread 'MainThread':" in log
    assert "thread 'orchestrator-loop-watchdog':" in log
    time.sleep(0.2)
    assert pids_alive([run_pid]) == []


def test_short_block_is_logged_and_degrades_health(tmp_path: Path) -> None:
    # Given: a service whose loop is blocked for 1 s once, 0.3 s after start.
    config = service_config(DEFAULT_PIPELINE + """
        [watchdog]
        loop_stall_warn = "0.3s"
        loop_stall_timeout = "30s"
        """)  # fmt: skip
    service = Service(tmp_path, config, env={"ORCH_TEST_BLOCK_LOOP": "1.0@0.3"})
    try:
        # When: it runs again
        service.wait_log(r"event loop ran again after being blocked for [\d.]+s")
        # Then: the warning named the task, /health says why it is degraded, metrics count it.
        assert re.search(rf"event loop blocked for [\d.]+s by task '{BLOCKED}'", service.log)
        status, body, _ = service.get("/health")
        health = json.loads(body)
        assert status == 503, health
        assert health["status"] == "degraded"
        assert any("event loop was blocked for" in r and BLOCKED in r for r in health["reasons"])
        metrics = service.get("/metrics")[1].decode()
        assert "orchestrator_loop_stalls_total 1.0" in metrics
        assert "orchestrator_healthy 0.0" in metrics
        assert service.proc.poll() is None
    finally:
        code = service.stop()
    assert code == 0


async def test_task_tree_names_tasks_and_folds_alike_siblings() -> None:
    async def idle() -> None:
        await trio.sleep_forever()

    async with trio.open_nursery() as nursery:
        for n in range(3):
            nursery.start_soon(idle, name=f"worker:x:{n}")
        nursery.start_soon(idle, name="lonely")
        await trio.sleep(0)
        tree = format_task_tree()
        nursery.cancel_scope.cancel()
    assert "- worker:x:0 (×3) @ idle (test_watchdog.py:" in tree
    assert "- lonely @ idle (test_watchdog.py:" in tree
    assert "test_task_tree_names_tasks_and_folds_alike_siblings" in tree


def pipeline(stage_lines: str = "") -> str:
    return f"""
        state_dir = "state"
        [http]
        listen = false
        [watchdog]
        stall_after = "0.3s"
        slot_wait_warn = "0.3s"
        [pools]
        gpu = 1
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["a"]
        [[stages]]
        name = "a"
        command = ["true"]
        timeout = "1s"
        grace_period = "0.5s"
        concurrency = 2
        {stage_lines}
        """


async def test_queued_items_with_free_slots_and_no_run_is_a_stall(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: an engine with an item queued, slots free, and (the fault) no worker taking it.
    config = write_config(pipeline())
    config.state_dir.mkdir()
    async with open_sqlite_store(config.state_dir / "db") as store:
        engine = Engine(config, store, instance="t")
        watchdog = Watchdog(engine)
        [item] = await store.ingest([NewItem(id="in:x", source="in", key="x", route=("a",))])
        engine.admit(item)
        with captured_logs() as lines:
            # When: stall_after passes
            watchdog.check_stalls()
            assert watchdog.stalls == {}
            await trio.sleep(0.4)
            watchdog.check_stalls()
            # Then: one warning with the task tree; health degraded; counted.
            [warning] = [line for line in lines if "pipeline stall" in line]
            assert "stage 'a': 1 item(s) waiting and slots free, but no run started" in warning
            assert "task tree:" in warning
            assert "test_queued_items_with_free_slots_and_no_run_is_a_stall" in warning
            assert watchdog.stall_counts["no_progress"] == 1
            [reason] = watchdog.health_reasons()
            assert reason.startswith("stage 'a': 1 item(s) waiting")
            # systemd's STATUS= gets it without the age that grows each second (session 17).
            assert watchdog.health_reasons(ages=False) == [
                "stage 'a': 1 item(s) waiting and slots free, but no run started for over 0.3s"
            ]
            watchdog.check_stalls()
            assert watchdog.stall_counts["no_progress"] == 1  # warned once per stall

            # When: a worker takes the item
            async with trio.open_nursery() as nursery:
                await nursery.start(engine.serve_timers)  # the stages' preparers live there
                nursery.start_soon(engine.serve_worker, config.stage("a"))
                await engine.outstanding.wait_value(0)
                engine.stop_taking_work()
                nursery.cancel_scope.cancel()
            watchdog.check_stalls()
            # Then: the stall clears (the engine is draining now: the test stopped it).
            assert watchdog.stalls == {}
            assert watchdog.health_reasons() == ["draining: shutting down"]
            assert any("stall cleared" in line for line in lines)


async def test_run_past_timeout_and_grace_is_overdue(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a run (timeout 1 s + grace 0.5 s) that began 3 s ago and is still there.
    config = write_config(pipeline())
    config.state_dir.mkdir()
    async with open_sqlite_store(config.state_dir / "db") as store:
        engine = Engine(config, store, instance="t")
        watchdog = Watchdog(engine)
        engine.running[7] = RunningRun(7, "in:x", "a", 1, pid=4242,
                                       since=trio.current_time() - 3)  # fmt: skip
        engine.running[8] = RunningRun(8, "in:y", "a", 1, pid=4243, since=trio.current_time())
        with captured_logs() as lines:
            # When
            watchdog.check_stalls()
        # Then: that one run is overdue, the other not.
        assert watchdog.stall_counts["overdue_run"] == 1
        [reason] = watchdog.health_reasons()
        assert (
            "run 7 of stage 'a' on item 'in:x' (pid 4242) is 3.0s old, past its timeout 1s"
            in reason
        )
        assert watchdog.health_reasons(ages=False) == [
            "run 7 of stage 'a' on item 'in:x' (pid 4242) is past its timeout 1s + grace 0.5s"
        ]
        assert any("pipeline stall (overdue_run)" in line and "task tree:" in line
                   for line in lines)  # fmt: skip

        # When: the run ends
        del engine.running[7]
        watchdog.check_stalls()
        assert watchdog.health_reasons() == []


async def test_long_slot_wait_is_a_stall_visible_on_health_and_metrics(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a service where "hog" holds the one gpu slot for 2 s and "b" needs it too.
    (tmp_path / "in").mkdir()
    config = write_config(f"""
        state_dir = "state"
        shutdown_grace = "5s"
        [http]
        listen = "127.0.0.1:0"
        [watchdog]
        slot_wait_warn = "0.4s"
        [pools]
        gpu = 1
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = ["hog", "b"]
        [[stages]]
        name = "hog"
        command = ["{PY}", "-c", "import sys, time; time.sleep(2 if sys.argv[1].endswith('1') else 0)", "{{path}}"]
        pools = ["gpu"]
        concurrency = 2
        grace_period = "0.5s"
        [[stages]]
        name = "b"
        command = ["true"]
        pools = ["gpu"]
        """)  # fmt: skip
    (tmp_path / "in" / "item1").write_text("")
    (tmp_path / "in" / "item2").write_text("")
    engines: list[Engine] = []
    with captured_logs() as lines:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve(config, on_start=engines.append))
            url = (await wait_logged(lines, r"http: listening on (\S+)")).group(1)
            # When: an item waits longer than slot_wait_warn
            warning = (await wait_logged(lines, r"(?s)pipeline stall \(slot_wait\).*")).group(0)
            # Then: the warning says who waits for what and who holds it, with the task tree;
            # /health is 503 with the reason; the metric counts it.
            assert re.search(r"has waited [\d.]+s for a slot of stage '(hog|b)' \(pool 'gpu' full,"
                             r" held by 'in:item1'\)", warning), warning  # fmt: skip
            assert "task tree:" in warning
            assert "worker:hog:" in warning
            status, body, _ = await aget(url + "/health")
            assert status == 503
            assert any("for a slot of stage" in r for r in json.loads(body)["reasons"])
            metrics = (await aget(url + "/metrics"))[1].decode()
            assert 'orchestrator_pipeline_stalls_total{kind="slot_wait"} 1.0' in metrics
            assert 'orchestrator_pipeline_stalled{kind="slot_wait"} 1.0' in metrics

            # When: the slot is free again and the items are done
            await engines[0].outstanding.wait_value(0)
            await wait_logged(lines, "stall cleared")
            # Then: healthy again.
            assert (await aget(url + "/health"))[0] == 200
            os.kill(os.getpid(), signal.SIGTERM)


async def test_a_run_that_never_ends_without_a_timeout_is_a_slot_wait_stall(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Found by an acceptance tester (session 17): items queued behind a stage's own full limit
    # are not slot waiters (a stage has one worker per slot), so a run that never ended, in a
    # stage without `timeout` (the default), held the pipeline for good with /health ok.
    # Given: a service whose one-at-a-time stage, without a timeout, never ends its first run.
    (tmp_path / "in").mkdir()
    config = write_config("""
        state_dir = "state"
        shutdown_grace = "0.5s"
        [http]
        listen = "127.0.0.1:0"
        [watchdog]
        slot_wait_warn = "0.5s"
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = ["hang"]
        [[stages]]
        name = "hang"
        command = ["sleep", "60"]
        grace_period = "0.5s"
        """)  # fmt: skip
    for name in ("item1", "item2", "item3"):
        (tmp_path / "in" / name).write_text("")
    with captured_logs() as lines:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve, config)
            url = (await wait_logged(lines, r"http: listening on (\S+)")).group(1)
            # When: no run of it starts or ends for longer than slot_wait_warn
            warning = (await wait_logged(lines, r"(?s)pipeline stall \(slot_wait\).*")).group(0)
            # Then: the warning names the stage, the items queued and the run holding it;
            # /health is 503 with the reason.
            assert re.search(r"stage 'hang': 2 item\(s\) queued, all 1 of its slots busy and no run"
                             r" of it started or ended for [\d.]+s \(run \d+ on 'in:item\d' for"
                             r" [\d.]+s \(pid \d+\)\)", warning), warning  # fmt: skip
            status, body, _ = await aget(url + "/health")
            assert status == 503
            assert any("slots busy" in r for r in json.loads(body)["reasons"])
            os.kill(os.getpid(), signal.SIGTERM)


async def test_run_end_observer_marks_stage_progress(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # A run shorter than one check still counts as a start for its stage.
    config = write_config(pipeline())
    config.state_dir.mkdir()
    async with open_sqlite_store(config.state_dir / "db") as store:
        engine = Engine(config, store, instance="t")
        watchdog = Watchdog(engine)
        result = RunResult(outcome=Outcome.OK, exit_code=0, signal=None, pid=1, duration=0.01,
                           tail="", reason="ok")  # fmt: skip
        before = trio.current_time()
        for observe in engine.on_run_end:
            observe("a", result, 0.0, Transition(state=ItemState.DONE, stage_index=1, attempts=1))
        assert before <= watchdog._last_start["a"] <= trio.current_time()

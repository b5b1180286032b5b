"""/metrics: the named series, fed by real runs, and Prometheus's own checker (promtool) on them."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import trio
from conftest import PY
from prometheus_client.parser import text_string_to_metric_families
from servicekit import aget, captured_logs, need_tool, wait_logged

from orchestrator.metrics import Metrics
from orchestrator.store.sqlite import open_sqlite_store
from orchestrator.supervisor import serve
from orchestrator.watchdog import Watchdog
from orchestrator.workers import Engine

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from orchestrator.config import Config

#: Every series DESIGN §8 names, as exposed.
NAMED = [
    "orchestrator_items",                               # items by state
    "orchestrator_stage_runs_total",                    # runs by outcome
    "orchestrator_run_duration_seconds_bucket",         # duration histogram per stage
    "orchestrator_slot_wait_seconds_bucket",            # slot-wait histogram per stage
    "orchestrator_slots_busy",                          # slots busy/total and waiters
    "orchestrator_slots_capacity",
    "orchestrator_slot_waiters",
    "orchestrator_retries_total",                       # retries
    "orchestrator_kills_total",                         # kills by signal
    "orchestrator_loop_lag_seconds_bucket",             # loop lag
    "orchestrator_source_last_poll_timestamp_seconds",  # last poll per source
]  # fmt: skip

STAGE = "import os, sys, time; {body}"
#: Attempt 1 kills itself with SIGKILL (a signal nobody here sent); attempt 2 is fine.
FLAKY = STAGE.format(body="os.environ['ORCH_ATTEMPT'] == '1' and os.kill(os.getpid(), 9)")
#: Sleeps as long as the item's file says: "0" is ok, "5" outlives the 0.3 s timeout.
SLEEPY = STAGE.format(body="time.sleep(float(open(sys.argv[1]).read()))")


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name, frozenset(s.labels.items())] = s.value
    return out


def value(found: dict[tuple[str, frozenset[tuple[str, str]]], float], series: str,
          **labels: str) -> float:  # fmt: skip
    return found[series, frozenset(labels.items())]


@pytest.fixture
def promtool() -> str:
    # A sync fixture: a skip raised inside the trio test would lose its reason.
    return need_tool("promtool", "Prometheus's checker, from Debian's prometheus package")


async def test_metrics_after_real_runs_pass_promtool(
    tmp_path: Path, write_config: Callable[[str], Config], promtool: str
) -> None:
    # Given: two items through flaky (killed once, retried) → sleepy (gpu pool; one times out).
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "ok").write_text("0")
    (tmp_path / "in" / "late").write_text("5")
    config = write_config(f"""
        state_dir = "state"
        [http]
        listen = "127.0.0.1:0"
        [pools]
        gpu = 1
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = ["flaky", "sleepy"]
        [[stages]]
        name = "flaky"
        command = ["{PY}", "-c", "{FLAKY}"]
        retries = 1
        backoff = "0.01s"
        backoff_max = "0.01s"
        [[stages]]
        name = "sleepy"
        command = ["{PY}", "-c", "{SLEEPY}", "{{path}}"]
        pools = ["gpu"]
        timeout = "0.5s"
        grace_period = "0.2s"
        """)  # fmt: skip
    engines: list[Engine] = []
    with captured_logs() as lines:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: serve(config, on_start=engines.append))
            url = (await wait_logged(lines, r"http: listening on (\S+)")).group(1)
            engine = engines[0]
            with trio.fail_after(20):
                await engine.sources_exhausted.wait_value(0)  # started
                while engine.tally.finished < 2:
                    await trio.sleep(0.05)
            # (the pollers report their polls in engine.last_poll; make sure there is one)
            engine.last_poll.setdefault("in", trio.current_time())

            # When
            status, body, headers = await aget(url + "/metrics")
            os.kill(os.getpid(), signal.SIGTERM)

    # Then: Prometheus's own checker is happy with it…
    assert status == 200
    assert headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = body.decode()
    check = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True,
                           timeout=30, check=False)  # fmt: skip
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    # … every named series is there, without _created series…
    for name in NAMED:
        assert f"\n{name}" in text, name
    assert "_created" not in text
    # … and the values say what happened.
    found = samples(text)
    assert value(found, "orchestrator_stage_runs_total", stage="flaky", outcome="killed") == 2
    assert value(found, "orchestrator_stage_runs_total", stage="flaky", outcome="ok") == 2
    assert value(found, "orchestrator_stage_runs_total", stage="sleepy", outcome="ok") == 1
    assert value(found, "orchestrator_stage_runs_total", stage="sleepy", outcome="timeout") == 1
    assert value(found, "orchestrator_retries_total", stage="flaky") == 2
    assert value(found, "orchestrator_runs_killed_by_signal_total", stage="flaky",
                 signal="SIGKILL") == 2  # fmt: skip
    assert value(found, "orchestrator_kills_total", stage="sleepy", signal="SIGTERM") == 1
    assert value(found, "orchestrator_run_duration_seconds_count", stage="sleepy") == 2
    assert value(found, "orchestrator_slot_wait_seconds_count", stage="flaky") == 4
    assert value(found, "orchestrator_items", stage="sleepy", state="done") == 1
    assert value(found, "orchestrator_items", stage="sleepy", state="dead") == 1
    assert value(found, "orchestrator_slots_capacity", kind="pool", name="gpu") == 1
    assert value(found, "orchestrator_slots_busy", kind="pool", name="gpu") == 0
    assert value(found, "orchestrator_slot_waiters", kind="stage", name="sleepy") == 0
    assert value(found, "orchestrator_loop_lag_seconds_count") > 0
    polled = value(found, "orchestrator_source_last_poll_timestamp_seconds", source="in")
    assert abs(polled - time.time()) < 30
    assert value(found, "orchestrator_healthy") == 1
    assert value(found, "orchestrator_build_info", version="0.1.0") == 1
    assert value(found, "process_resident_memory_bytes") > 10e6


async def test_each_service_has_its_own_registry(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    config = write_config("""
        state_dir = "state"
        [[stages]]
        name = "a"
        command = ["true"]
        """)  # fmt: skip
    config.state_dir.mkdir()
    async with open_sqlite_store(config.state_dir / "db") as store:
        engines = [Engine(config, store, instance=str(n)) for n in range(2)]
        # Two services in one process do not clash (the global registry would refuse the second).
        first, second = (Metrics(e, Watchdog(e)) for e in engines)
        assert first.registry is not second.registry
        await first.refresh()
        assert b'orchestrator_stage_runs_total{outcome="ok",stage="a"} 0.0' in first.render()

"""The HTTP face: real HTTP on 127.0.0.1 (port 0), a real store, a real full disk."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import time
from typing import TYPE_CHECKING

import pytest
import trio
from conftest import fill
from servicekit import DEFAULT_PIPELINE, Service, aget, http_get, service_config

from orchestrator.cli import EXIT_FAILED
from orchestrator.errors import StoreUnavailable
from orchestrator.store.records import NewItem
from orchestrator.store.sqlite import open_sqlite_store
from orchestrator.watchdog import Watchdog
from orchestrator.web import HttpUnavailable, serve_http
from orchestrator.workers import Engine

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from orchestrator.config import Config

PIPELINE = """
    state_dir = "state"
    [http]
    listen = "127.0.0.1:0"
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
    pools = ["gpu"]
    """


def fetch(method: str, url: str) -> tuple[int, bytes, dict[str, str]]:
    conn = http.client.HTTPConnection(url.split("//")[1].split("/")[0], timeout=5)
    try:
        conn.request(method, "/" + url.split("//")[1].partition("/")[2])
        response = conn.getresponse()
        return response.status, response.read(), dict(response.headers)
    finally:
        conn.close()


@contextlib.asynccontextmanager
async def web(config: Config, db: Path | None = None) -> AsyncIterator[tuple[Engine, str]]:
    """The HTTP server on a real engine and store, without workers or sources."""
    config.state_dir.mkdir(exist_ok=True)
    async with open_sqlite_store(db or config.state_dir / "orchestrator.db") as store:
        engine = Engine(config, store, instance="test")
        watchdog = Watchdog(engine)
        async with trio.open_nursery() as nursery:
            [url] = await nursery.start(
                functools.partial(serve_http, engine, watchdog, listen="127.0.0.1:0")
            )
            yield engine, url
            nursery.cancel_scope.cancel()


async def test_routes(write_config: Callable[[str], Config]) -> None:
    async with web(write_config(PIPELINE)) as (_engine, url):
        status, body, headers = await aget(url + "/health")
        assert (status, json.loads(body)) == (200, {"status": "ok", "reasons": []})
        assert headers["content-type"] == "application/json"
        assert headers["cache-control"] == "no-store"

        status, body, _ = await aget(url + "/status")
        doc = json.loads(body)
        assert status == 200
        assert doc["pid"] == os.getpid()
        assert doc["state"] == "running"
        assert doc["stages"]["a"]["concurrency"] == 1
        assert doc["pools"]["gpu"]["size"] == 1
        assert doc["health"] == {"status": "ok", "reasons": []}

        status, body, headers = await aget(url + "/")
        assert status == 200
        assert headers["content-type"].startswith("text/html")
        assert b'<table id="stages">' in body
        assert b'fetch("status"' in body

        status, body, _ = await aget(url + "/nope")
        assert status == 404
        assert json.loads(body)["pages"] == ["/", "/health", "/metrics", "/status"]

        status, body, headers = await trio.to_thread.run_sync(fetch, "POST", url + "/health")
        assert status == 405
        assert headers["allow"] == "GET, HEAD"

        status, body, headers = await trio.to_thread.run_sync(fetch, "HEAD", url + "/metrics")
        assert status == 200
        assert body == b""
        assert int(headers["content-length"]) > 1000


async def test_draining_engine_is_503(write_config: Callable[[str], Config]) -> None:
    async with web(write_config(PIPELINE)) as (engine, url):
        engine.stop_taking_work()
        status, body, _ = await aget(url + "/health")
        assert status == 503
        assert json.loads(body) == {"status": "draining", "reasons": ["draining: shutting down"]}


async def test_health_is_503_when_the_store_cannot_be_written(
    disk: Path, write_config: Callable[[str], Config]
) -> None:
    config = write_config(PIPELINE)
    async with web(config, db=disk / "orchestrator.db") as (engine, url):
        assert (await aget(url + "/health"))[0] == 200
        # Given: the store's disk is full
        filler = await trio.to_thread.run_sync(fill, disk)
        # When: a write is tried (what an ingest of a big record does)
        item = NewItem(id="in:big", source="in", key="big", route=("a",), payload="x" * 300_000)
        with pytest.raises(StoreUnavailable, match="database or disk is full"):
            await engine.store.ingest([item])
        # Then: /health is 503 and says why; the metric shows it.
        status, body, _ = await aget(url + "/health")
        doc = json.loads(body)
        assert status == 503, doc
        assert doc["status"] == "degraded"
        [reason] = doc["reasons"]
        assert reason.startswith("store: cannot write the store")
        assert "database or disk is full" in reason
        metrics = (await aget(url + "/metrics"))[1].decode()
        assert "orchestrator_store_write_failed 1.0" in metrics

        # When: there is room again and a write succeeds
        filler.unlink()
        await engine.store.ingest([NewItem(id="in:x", source="in", key="x", route=("a",))])
        # Then: healthy again.
        assert (await aget(url + "/health"))[0] == 200


async def test_port_taken_is_a_clear_error(write_config: Callable[[str], Config]) -> None:
    config = write_config(PIPELINE)
    config.state_dir.mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        listen = f"127.0.0.1:{taken.getsockname()[1]}"
        async with open_sqlite_store(config.state_dir / "db") as store:
            engine = Engine(config, store, instance="t")
            message = f"cannot listen on '{listen}' for HTTP: address already in use; free the port"
            with pytest.RaisesGroup(pytest.RaisesExc(HttpUnavailable, match=message)):
                async with trio.open_nursery() as nursery:
                    await nursery.start(
                        functools.partial(serve_http, engine, Watchdog(engine), listen=listen)
                    )


def test_run_exits_1_when_its_port_is_taken(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        service = Service(tmp_path, service_config(DEFAULT_PIPELINE, listen=f"127.0.0.1:{port}"))
        code = service.wait()
    assert code == EXIT_FAILED
    assert f"orchestrator: cannot listen on '127.0.0.1:{port}' for HTTP: address already in use" \
           in service.log  # fmt: skip
    assert "Traceback" not in service.log


def test_service_answers_until_drained_then_stops(tmp_path: Path) -> None:
    # Given: a service with a 1.5 s run going on
    service = Service(tmp_path, service_config(DEFAULT_PIPELINE))
    try:
        url = service.url
        (tmp_path / "in" / "slow").write_text("1.5")
        service.wait_log("ingested")
        time.sleep(0.3)
        assert http_get(url + "/health")[0] == 200
        # When: SIGTERM; the run is allowed to finish
        service.signal(signal.SIGTERM)
        service.wait_log("draining")
        # Then: HTTP still answers, 503 draining, and the run shows on /status
        status, body, _ = http_get(url + "/health")
        assert (status, json.loads(body)["status"]) == (503, "draining")
        doc = json.loads(http_get(url + "/status")[1])
        assert doc["state"] == "draining"
        assert [r["item"] for r in doc["running"]] == ["in:slow"]
        assert service.wait() == 0
        # and then the port is closed.
        with pytest.raises(OSError):
            http_get(url + "/health", timeout=1)
    finally:
        service.stop()


def test_a_service_whose_store_disk_fills_up_exits_3_with_one_line(
    disk: Path, tmp_path: Path
) -> None:
    # Found in session 6: the store's failure was buried in a 150-line traceback
    # ("Nursery is closed to new arrivals") and the exit status was 1, not 3.
    import sys

    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = tmp_path / "c.toml"
    config.write_text(
        f'state_dir = "{disk}/state"\n'
        "[http]\nlisten = false\n"
        '[[sources]]\nname = "in"\ntype = "directory"\npath = "inbox"\nsettle = "0s"\n'
        'poll_interval = "100ms"\nroute = ["s"]\n'
        '[[stages]]\nname = "s"\nconcurrency = 2\n'
        'command = ["sh", "-c", "head -c 30000 /dev/urandom | base64"]\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "run", "-c", str(config)],
        cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.0)
        for i in range(80):  # their logs (30 kB each, base64) fill the 1 MiB disk
            (inbox / f"f{i:02}.txt").write_text(str(i))
        _, err = proc.communicate(timeout=90)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 3, err[-3000:]
    assert "Traceback" not in err
    assert err.splitlines()[-1].startswith("orchestrator: cannot write the store")
    assert "database or disk is full" in err.splitlines()[-1]


WAITERS_PIPELINE = """
    [pools]
    gpu = 1
    [[sources]]
    name = "in"
    type = "directory"
    path = "in"
    settle = "0s"
    poll_interval = "0.1s"
    route = ["a"]
    [[stages]]
    name = "a"
    command = ["sleep", "30"]
    concurrency = 2
    pools = ["gpu"]
    """


def test_status_lists_each_waiter_under_the_limit_it_waits_for(tmp_path: Path) -> None:
    # Found in session 15: a run holding its stage's slot while it waited for a pool was listed
    # among the stage's waiters, whose `waiting` said 0; the pool had no waiters at all.
    config = service_config(WAITERS_PIPELINE).replace('shutdown_grace = "5s"',
                                                      'shutdown_grace = "0.5s"')  # fmt: skip
    service = Service(tmp_path, config)
    try:
        url = service.url
        # Given: two items for stage a, which has room for 2 but there is one gpu
        for name in ("a1", "a2"):
            (tmp_path / "in" / name).touch()
        deadline = time.monotonic() + 15
        while True:
            doc = json.loads(http_get(url + "/status")[1])
            if doc["running"] and doc["pools"]["gpu"]["waiting"] == 1:
                break
            assert time.monotonic() < deadline, doc
            time.sleep(0.1)
        # Then: the second holds a slot of a and waits for the gpu: it is the pool's waiter,
        a, gpu = doc["stages"]["a"], doc["pools"]["gpu"]
        [pool_waiter] = gpu["waiters"]
        assert pool_waiter["stage"] == "a"
        assert {pool_waiter["item"], *gpu["holders"]} == {"in:a1", "in:a2"}
        assert pool_waiter["waited"] >= 0
        # not the stage's, which waits for nobody.
        assert (a["busy"], a["waiting"], a["waiters"]) == (2, 0, [])

        # The status file (rewritten every 0.3 s) says the same.
        def file_waiters() -> list[str]:
            return [w["item"] for w in service.status()["pools"]["gpu"].get("waiters", [])]

        while file_waiters() != [pool_waiter["item"]]:
            assert time.monotonic() < deadline, service.status()
            time.sleep(0.1)
    finally:
        assert service.stop() == 0


def test_the_last_failures_are_still_shown_after_a_restart(tmp_path: Path) -> None:
    # Found in session 15: `recent_errors` (status file, /status, the page's failures) was
    # empty after every restart, though the store had the failures.
    config = service_config("""
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        settle = "0s"
        poll_interval = "0.1s"
        route = ["work"]
        [[stages]]
        name = "work"
        command = ["sh", "-c", "echo broken >&2; exit 3"]
        retries = 0
        """)  # fmt: skip
    service = Service(tmp_path, config)
    try:
        url = service.url
        (tmp_path / "in" / "bad").touch()
        deadline = time.monotonic() + 15
        while not (errors := json.loads(http_get(url + "/status")[1])["recent_errors"]):
            assert time.monotonic() < deadline, service.log
            time.sleep(0.1)
        [before] = errors
        assert (before["item"], before["outcome"], before["next"]) == ("in:bad", "failed", "dead")
    finally:
        assert service.stop() == 0
    # When: the service starts again
    service = Service(tmp_path, config)
    try:
        [after] = json.loads(http_get(service.url + "/status")[1])["recent_errors"]
        # Then: the failure is still there, as it was (what came next is not recorded).
        assert {k: after[k] for k in ("item", "stage", "attempt", "outcome", "reason")} == {
            k: before[k] for k in ("item", "stage", "attempt", "outcome", "reason")
        }
        assert after["at"] == pytest.approx(before["at"], abs=1.0)
        assert after["next"] is None
    finally:
        assert service.stop() == 0

"""Sources end to end: the service (in-process or as a subprocess), real files, real time."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING

import trio
from conftest import PY, capture_sources, open_db
from servicekit import captured_logs, wait_logged

from orchestrator.sources import DirectorySource
from orchestrator.sources.jsonarray import JsonArraySource
from orchestrator.store.sqlite import op_requeue
from orchestrator.supervisor import serve

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable
    from pathlib import Path

    import pytest

    from orchestrator.config import Config
    from orchestrator.supervisor import ServiceResult
    from orchestrator.workers import Engine


def items_of(config: Config) -> list[tuple[str, str, str | None, str | None]]:
    """``(id, state, payload, reason)`` of every item, in ingest order."""
    with open_db(config.state_dir / "orchestrator.db") as db:
        return db.execute("SELECT id, state, payload, reason FROM items ORDER BY seq").fetchall()


async def serve_until(
    config: Config, until: Callable[[Engine], bool],
    during: Callable[[Engine], Awaitable[None]] | None = None, *, timeout: float = 20,
) -> ServiceResult:  # fmt: skip
    """Run the service in-process; SIGTERM it once ``during`` returned and ``until`` holds."""
    engines: list[Engine] = []
    result: ServiceResult | None = None

    async def service() -> None:
        nonlocal result
        result = await serve(config, on_start=engines.append)

    with trio.fail_after(timeout):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(service)
            while not engines:
                await trio.sleep(0.01)
            if during is not None:
                await during(engines[0])
            while not until(engines[0]):
                await trio.sleep(0.02)
            os.kill(os.getpid(), signal.SIGTERM)
    assert result is not None
    return result


#: A service watching ideas.json (a json source keyed by "id") with one `true` stage.
IDEAS_SERVICE = """
    [http]
    listen = false
    [[sources]]
    name = "ideas"
    type = "json"
    path = "ideas.json"
    id_field = "id"
    route = ["s"]
    poll_interval = "30ms"
    [[stages]]
    name = "s"
    command = ["true"]
    """


# --- directory ------------------------------------------------------------------------------


async def test_a_thousand_files_arriving_at_once_are_each_taken_once(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: the service watching an empty folder.
    inbox = tmp_path / "in"
    inbox.mkdir()
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "100ms"
        poll_interval = "50ms"
        [[stages]]
        name = "s"
        command = ["true"]
        concurrency = 4
        """)

    async def arrive(_engine: Engine) -> None:
        def write() -> None:
            for i in range(1000):
                (inbox / f"f{i:04d}.dat").write_text(str(i))

        await trio.to_thread.run_sync(write)

    # When: 1,000 files land in one burst, while the poller scans.
    await serve_until(config, lambda e: e.tally.done >= 1000, arrive)

    # Then: 1,000 items, one run each.
    rows = items_of(config)
    assert len(rows) == 1000
    assert {r[0] for r in rows} == {f"in:f{i:04d}.dat" for i in range(1000)}
    with open_db(config.state_dir / "orchestrator.db") as db:
        assert db.execute("SELECT count(*), count(DISTINCT item_seq) FROM runs").fetchone() == (
            1000, 1000,
        )  # fmt: skip


async def test_a_file_still_being_written_is_taken_once_settled(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a file written in ten pieces 80 ms apart, settle 300 ms.
    inbox, out = tmp_path / "in", tmp_path / "out"
    inbox.mkdir()
    out.mkdir()
    config = write_config(f"""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["copy"]
        settle = "300ms"
        poll_interval = "50ms"
        [[stages]]
        name = "copy"
        command = ["cp", "--", "{{path}}", "{out}"]
        """)
    last_write = 0.0

    async def write_slowly(_engine: Engine) -> None:
        nonlocal last_write
        with open(inbox / "growing.bin", "wb", buffering=0) as f:
            for i in range(10):
                f.write(bytes([i]) * 1000)
                last_write = time.time()
                await trio.sleep(0.08)

    # When
    await serve_until(config, lambda e: e.tally.done >= 1, write_slowly)

    # Then: one item, taken at least `settle` after the last write, with the whole file.
    assert (out / "growing.bin").read_bytes() == b"".join(bytes([i]) * 1000 for i in range(10))
    with open_db(config.state_dir / "orchestrator.db") as db:
        [(created,)] = db.execute("SELECT created_at FROM items").fetchall()
    assert created >= last_write + 0.3 - 0.01


async def test_a_file_deleted_between_scan_and_ingest_becomes_a_dead_item_with_reason(
    tmp_path: Path, write_config: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: a scan that sees a file which is deleted right after (before its ingest).
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "stays").write_text("x")
    (tmp_path / "in" / "goes").write_text("x")
    real_scan = DirectorySource.scan

    def scan_then_delete(self: DirectorySource) -> list:  # type: ignore[type-arg]
        found = real_scan(self)
        if (tmp_path / "in" / "goes").exists():
            (tmp_path / "in" / "goes").unlink()
        return found

    monkeypatch.setattr(DirectorySource, "scan", scan_then_delete)
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        [[stages]]
        name = "s"
        command = ["true"]
        """)

    # When
    result = await serve(config, batch=True)

    # Then: no crash; the file seen is not lost silently: a dead item says what happened.
    assert (result.tally.done, result.tally.dead) == (1, 1)
    reasons = {r[0]: (r[1], r[3]) for r in items_of(config)}
    gone = str(tmp_path / "in" / "goes")
    assert reasons["in:goes"] == ("dead", f"s: source file {gone!r} vanished before its run")
    assert reasons["in:stays"] == ("done", None)


async def test_on_done_move_and_on_dead_move_and_leftovers_after_a_restart(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: one file a stage accepts, one it fails, in a subfolder of a recursive source.
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "in" / "sub" / "ok.txt").write_text("ok")
    (tmp_path / "in" / "sub" / "bad.txt").write_text("bad")
    (tmp_path / "done" / "sub").mkdir(parents=True)
    (tmp_path / "done" / "sub" / "ok.txt").write_text("an earlier ok.txt")
    stage = 'command = ["sh", "-c", "case $1 in *bad*) exit 3;; esac", "sh", "{path}"]'
    template = """
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        recursive = true
        route = ["s"]
        settle = "0s"
        on_done = "{on_done}"
        on_dead = "{on_dead}"
        [[stages]]
        name = "s"
        {stage}
        """
    # When: a batch that keeps everything, then one that moves (the first one "crashed"
    # before moving: its ended items' files are moved at the next start).
    keep = write_config(template.format(on_done="keep", on_dead="keep", stage=stage))
    first = await serve(keep, batch=True)
    assert (first.tally.done, first.tally.dead) == (1, 1)
    assert sorted(p.name for p in (tmp_path / "in" / "sub").iterdir()) == ["bad.txt", "ok.txt"]
    move = write_config(template.format(on_done="move:done", on_dead="move:failed", stage=stage))
    await serve(move, batch=True)

    # Then: moved with their relative paths, nothing overwritten, the inbox empty.
    assert (tmp_path / "done" / "sub" / "ok.txt").read_text() == "an earlier ok.txt"
    assert (tmp_path / "done" / "sub" / "ok.1.txt").read_text() == "ok"
    assert (tmp_path / "failed" / "sub" / "bad.txt").read_text() == "bad"
    assert list((tmp_path / "in" / "sub").iterdir()) == []

    # And the item follows its file: a dead item requeued runs on the moved file (here with a
    # stage that now accepts it), and is moved from there on to done/ when it is done.
    rows = {r[0]: r for r in items_of(move)}
    with open_db(move.state_dir / "orchestrator.db") as db:
        paths = dict(db.execute("SELECT id, path FROM items"))
        assert paths["in:sub/bad.txt"] == str(tmp_path / "failed" / "sub" / "bad.txt")
        db.execute("BEGIN IMMEDIATE")
        assert op_requeue(db, ["in:sub/bad.txt"], dead=False, stage=None).requeued
        db.execute("COMMIT")
    assert rows["in:sub/bad.txt"][1] == "dead"
    fixed = write_config(template.format(on_done="move:done", on_dead="move:failed",
                                         stage='command = ["true"]'))  # fmt: skip
    (tmp_path / "in" / "sub" / "new.txt").write_text("new")
    third = await serve(fixed, batch=True)
    assert third.tally.done == 2
    # In a batch that moves from the start, its last items' files are moved before it ends.
    assert (tmp_path / "done" / "sub" / "new.txt").read_text() == "new"
    assert (tmp_path / "done" / "sub" / "bad.txt").read_text() == "bad"
    assert list((tmp_path / "failed" / "sub").iterdir()) == []


async def test_on_done_delete(tmp_path: Path, write_config: Callable[[str], Config]) -> None:
    (tmp_path / "in").mkdir()
    for name in ("a", "b"):
        (tmp_path / "in" / name).write_text(name)
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        on_done = "delete"
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    result = await serve(config, batch=True)
    assert result.tally.done == 2
    assert list((tmp_path / "in").iterdir()) == []


async def test_a_reused_name_is_left_alone_with_a_warning_also_after_a_restart(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # A camera that starts its numbering again: IMG_0001 was taken and deleted, and a new
    # IMG_0001 is a different file under a taken name. Without reingest_changed it is not
    # taken, and it must never be deleted as if it were the old item's leftover: not by the
    # service that saw the old one go, nor by the next start, which asks the store about it.
    (tmp_path / "in").mkdir()
    img = tmp_path / "in" / "IMG_0001"
    img.write_text("first")
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        poll_interval = "50ms"
        on_done = "delete"
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    with captured_logs("WARNING") as lines:

        async def reuse(engine: Engine) -> None:
            with trio.fail_after(10):
                while img.exists():  # taken, done, deleted
                    await trio.sleep(0.02)
            img.write_text("second")
            await wait_logged(lines, "'IMG_0001' is back after its item's file was")

        first = await serve_until(config, lambda engine: True, reuse)
    assert first.tally.done == 1
    assert img.read_text() == "second"
    with captured_logs("WARNING") as lines:
        again = await serve(config, batch=True)
    assert (again.tally.admitted, again.tally.done) == (0, 0)
    assert img.read_text() == "second"
    assert ["'IMG_0001' is back" in line for line in lines] == [True]
    assert [row[:2] for row in items_of(config)] == [("in:IMG_0001", "done")]


async def test_a_file_listed_just_before_this_service_moved_it_is_not_said_to_be_back(
    tmp_path: Path, write_config: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Found resuming an interrupted batch (session 15): the first scan listed files whose
    # items then ended and were moved to done/ before the scan's answer was checked against
    # the store -- each was then warned about as a file "back after its item's file was
    # moved". Here the scan's listing is made stale on purpose: it still holds the moved file.
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("a")
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        on_done = "move:done"
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    first = await serve(config, batch=True)
    assert first.tally.done == 1
    assert (tmp_path / "done" / "a.txt").exists()
    stale = DirectorySource.scan

    def scan_listing_the_moved_file(self: DirectorySource) -> list:  # type: ignore[type-arg]
        files = stale(self)
        moved = os.stat(tmp_path / "done" / "a.txt")
        return [
            *files,
            type(files[0])(
                rel="a.txt",
                path=str(tmp_path / "in" / "a.txt"),
                size=moved.st_size,
                mtime_ns=moved.st_mtime_ns,
            ),
        ]

    (tmp_path / "in" / "b.txt").write_text("b")  # (so that the listing has a FileSeen to copy)
    monkeypatch.setattr(DirectorySource, "scan", scan_listing_the_moved_file)
    with captured_logs("WARNING") as lines:
        again = await serve(config, batch=True)
    assert again.tally.done == 1  # b.txt
    assert not [line for line in lines if "is back" in line], lines


async def test_a_service_that_moves_every_file_remembers_only_what_the_folder_holds(
    tmp_path: Path, write_config: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The source's memory of taken names follows the folder, not its history: here one file
    # in each round fails and stays (on_dead = keep), the others are moved away.
    sources = capture_sources(monkeypatch, DirectorySource)
    (tmp_path / "in").mkdir()
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["s"]
        settle = "0s"
        poll_interval = "50ms"
        on_done = "move:done"
        [[stages]]
        name = "s"
        command = ["sh", "-c", 'case "$1" in *bad*) exit 3;; esac', "sh", "{path}"]
        """)

    async def rounds(engine: Engine) -> None:
        for r in range(3):
            for i in range(30):
                (tmp_path / "in" / f"r{r}-{i:02d}").write_text("x")
            (tmp_path / "in" / f"r{r}-bad").write_text("x")
            with trio.fail_after(15):
                while (engine.tally.done, engine.tally.dead) != (30 * (r + 1), r + 1):
                    await trio.sleep(0.02)
                kept = {f"r{k}-bad" for k in range(r + 1)}
                while {p.name for p in (tmp_path / "in").iterdir()} != kept:
                    await trio.sleep(0.02)
                scans = engine.last_poll["in"]
                while engine.last_poll["in"] <= scans + 0.1:  # a scan after the moves
                    await trio.sleep(0.02)
            assert sources[0].known == kept

    await serve_until(config, lambda engine: True, rounds)
    assert len(list((tmp_path / "done").iterdir())) == 90
    # A restart does not load what the source took before: its first scan asks the store
    # about the three files it finds, which stay known (their items are dead: kept).
    with captured_logs("WARNING") as lines:
        again = await serve(config, batch=True)
    assert again.tally.admitted == 0
    assert sources[1].known == {"r0-bad", "r1-bad", "r2-bad"}
    assert lines == []
    assert len(items_of(config)) == 93


async def test_reingest_changed_true_takes_a_rewritten_file_again_false_does_not(
    tmp_path: Path, write_config: Callable[..., Config]
) -> None:
    for flag in ("true", "false"):
        folder = tmp_path / flag
        (folder / "in").mkdir(parents=True)
        doc = folder / "in" / "doc.txt"
        doc.write_text("v1")
        config = write_config(f"""
            state_dir = "{flag}/state"
            [http]
            listen = false
            [[sources]]
            name = "in"
            type = "directory"
            path = "{flag}/in"
            route = ["s"]
            settle = "0s"
            reingest_changed = {flag}
            [[stages]]
            name = "s"
            command = ["true"]
            """, name=f"{flag}.toml")  # fmt: skip
        assert (await serve(config, batch=True)).tally.done == 1
        doc.write_text("version 2")
        os.utime(doc, (time.time() + 5, time.time() + 5))
        again = await serve(config, batch=True)
        assert again.tally.done == (1 if flag == "true" else 0), flag
        # Unchanged since: nothing new either way.
        assert (await serve(config, batch=True)).tally.done == 0


# --- jsonl ----------------------------------------------------------------------------------


def orchestrator(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "orchestrator", *args],
        cwd=cwd, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_jsonl_batch_gives_stages_the_record_and_shows_rejected_lines(tmp_path: Path) -> None:
    # Given: a QA log with good records, a malformed line and a half-written last line.
    (tmp_path / "qa.jsonl").write_bytes(
        b'{"id": "QA-1", "title": "crash"}\n'
        b'{"id": "QA-2", "title": "typo"\n'
        b'{"id": "QA-3", "title": "slow \\u00e9"}\n'
        b'{"id": "QA-4", "tit'
    )
    (tmp_path / "c.toml").write_text(
        textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "qa"
        type = "jsonl"
        path = "qa.jsonl"
        id_field = "id"
        route = ["triage"]
        [[stages]]
        name = "triage"
        command = ["sh", "-c", 'cat "$1" >> seen.jsonl && echo >> seen.jsonl', "sh", "{payload}"]
        cwd = "."
        """)
    )

    # When
    proc = orchestrator("batch", "-c", "c.toml", "--json", "--no-progress", cwd=tmp_path)

    # Then: two records done (the stage got each as a JSON file), the bad line rejected (exit 1),
    # the half line left for later.
    assert proc.returncode == 1, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": 2, "rejected": 1}
    seen = [json.loads(line) for line in (tmp_path / "seen.jsonl").read_text().splitlines()]
    assert sorted(r["id"] for r in seen) == ["QA-1", "QA-3"]
    listed = orchestrator("items", "-c", "c.toml", "--state", "rejected", "--json", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    [rejected] = json.loads(listed.stdout)
    assert rejected["reason"].startswith(
        f"line 2 (byte 33) of {tmp_path / 'qa.jsonl'}: not valid JSON"
    )
    assert rejected["reason"].endswith("""raw: b'{"id": "QA-2", "title": "typo"'""")

    # And once the half line is completed, the next batch takes it and nothing else.
    with open(tmp_path / "qa.jsonl", "ab") as f:
        f.write(b'le": "hang"}\n')
    proc = orchestrator("batch", "-c", "c.toml", "--json", "--no-progress", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["states"] == {"done": 1}


def test_restart_after_sigkill_resumes_with_no_duplicate_and_no_gap(tmp_path: Path) -> None:
    # Given: the service following a JSONL log that a writer appends to in bursts.
    log = tmp_path / "events.jsonl"
    log.touch()
    config = tmp_path / "c.toml"
    config.write_text(
        textwrap.dedent("""
        [http]
        listen = false
        [[sources]]
        name = "events"
        type = "jsonl"
        path = "events.jsonl"
        route = ["s"]
        poll_interval = "20ms"
        [[stages]]
        name = "s"
        command = ["true"]
        concurrency = 4
        """)
    )
    total = 1500
    rng, kill_rng = random.Random(4), random.Random(5)
    service_up = threading.Event()

    def write() -> None:
        with open(log, "ab", buffering=0) as f:
            n = 0
            while n < total:
                burst = min(rng.randint(1, 60), total - n)
                # Sometimes a record is split across two writes (the poller may see half).
                data = b"".join(json.dumps({"n": n + i}).encode() + b"\n" for i in range(burst))
                cut = rng.randint(0, len(data))
                f.write(data[:cut])
                f.write(data[cut:])
                n += burst
                service_up.wait(30)  # the kills below overlap the writing, even on a slow host
                time.sleep(rng.uniform(0.02, 0.08))

    service_log = tmp_path / "service.log"

    def start() -> subprocess.Popen[bytes]:
        with open(service_log, "ab") as out:
            return subprocess.Popen(
                [PY, "-m", "orchestrator", "run", "-c", str(config)], cwd=tmp_path,
                stdin=subprocess.DEVNULL, stdout=out, stderr=out,
            )  # fmt: skip

    def counts() -> tuple[int, int]:
        try:
            with open_db(tmp_path / "state" / "orchestrator.db", timeout=5) as db:
                row = db.execute(
                    "SELECT count(*), count(*) FILTER (WHERE state = 'done') FROM items"
                ).fetchone()
        except sqlite3.OperationalError:
            return 0, 0
        return int(row[0]), int(row[1])

    # When: it is killed with SIGKILL three times while the writer goes on, and restarted.
    writer = threading.Thread(target=write)
    seen_at_kills: list[int] = []
    proc = start()
    try:
        writer.start()
        deadline = time.monotonic() + 30
        while counts()[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        service_up.set()
        for _ in range(3):
            time.sleep(kill_rng.uniform(0.3, 0.7))
            proc.kill()
            proc.wait()
            seen_at_kills.append(counts()[0])
            proc = start()
        writer.join()
        deadline = time.monotonic() + 40
        while counts() != (total, total) and time.monotonic() < deadline:
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    finally:
        service_up.set()
        writer.join()
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    # Then: every record became exactly one item, and every item is done.
    err = service_log.read_text()[-3000:]
    assert proc.returncode == 0, err
    with open_db(tmp_path / "state" / "orchestrator.db") as db:
        payloads = [json.loads(p)["n"] for (p,) in db.execute("SELECT payload FROM items")]
        states = db.execute("SELECT state, count(*) FROM items GROUP BY state").fetchall()
        position = db.execute("SELECT inode, offset FROM source_offsets").fetchone()
    assert 0 < seen_at_kills[0] < total  # killed while records were still arriving
    assert sorted(payloads) == list(range(total))
    assert states == [("done", total)], err
    assert position == (log.stat().st_ino, log.stat().st_size)


# --- json -----------------------------------------------------------------------------------


async def test_json_array_rewritten_in_place_with_a_new_element_adds_exactly_one(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: an ideas file with three ideas, watched by the service.
    ideas = tmp_path / "ideas.json"
    ideas.write_text(json.dumps([{"id": i, "idea": f"idea {i}"} for i in range(3)]))
    config = write_config(IDEAS_SERVICE)

    async def rewrite(engine: Engine) -> None:
        while engine.tally.done < 3:
            await trio.sleep(0.02)
        # When: the writer rewrites it in place, slowly (the poller sees it half-written), with
        # one more idea and the old ones edited.
        text = json.dumps([{"id": i, "idea": f"idea {i}, edited"} for i in range(4)]).encode()
        with open(ideas, "r+b", buffering=0) as f:
            f.truncate(0)
            f.write(text[: len(text) // 2])
            await trio.sleep(0.2)
            f.write(text[len(text) // 2 :])
        await trio.sleep(0.3)

    await serve_until(config, lambda e: e.tally.done >= 4, rewrite)

    # Then: exactly one new item, for the new id; known ids were not taken again.
    rows = items_of(config)
    assert [r[0] for r in rows] == ["ideas:0", "ideas:1", "ideas:2", "ideas:3"]
    assert json.loads(rows[3][2] or "") == {"id": 3, "idea": "idea 3, edited"}


async def test_json_array_with_a_rolling_window_takes_each_id_once_and_remembers_the_window(
    tmp_path: Path, write_config: Callable[[str], Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A writer that keeps only its latest 5 elements: the source remembers those (not every
    # id it ever took), and an old id that comes back is refused by the store, not taken again.
    sources = capture_sources(monkeypatch, JsonArraySource)
    ideas = tmp_path / "ideas.json"

    def window(first: int, last: int) -> None:
        tmp = tmp_path / "ideas.json.tmp"
        tmp.write_text(json.dumps([{"id": i} for i in range(first, last + 1)]))
        os.replace(tmp, ideas)

    window(0, 4)
    config = write_config(IDEAS_SERVICE)

    async def roll(engine: Engine) -> None:
        with trio.fail_after(15):
            while engine.tally.done < 5:
                await trio.sleep(0.02)
            for last in range(5, 20):
                window(last - 4, last)
                while engine.tally.done < last + 1:
                    await trio.sleep(0.02)
            while sources[0].known != {str(i) for i in range(15, 20)}:
                await trio.sleep(0.02)
            window(0, 4)  # the oldest ones again: taken already
            while sources[0].known != {str(i) for i in range(5)}:
                await trio.sleep(0.02)

    await serve_until(config, lambda engine: True, roll)
    assert [r[0] for r in items_of(config)] == [f"ideas:{i}" for i in range(20)]
    # A restart offers the file's elements to the store, which refuses them all.
    again = await serve(config, batch=True)
    assert again.tally.admitted == 0
    assert sources[1].known == {str(i) for i in range(5)}
    assert len(items_of(config)) == 20


async def test_batch_gives_up_on_a_json_file_that_never_parses(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    (tmp_path / "ideas.json").write_text('[{"id": 1}, ')
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "ideas"
        type = "json"
        path = "ideas.json"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """)
    with trio.fail_after(10):
        result = await serve(config, batch=True)
    assert result.tally.admitted == 0

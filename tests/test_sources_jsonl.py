"""The jsonl source without a store: pure line logic, then real files read through `read`/`apply`."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import pytest
from servicekit import captured_logs

from orchestrator.config import parse_config
from orchestrator.sources import JsonlSource, Position
from orchestrator.sources import jsonl as jsonl_module
from orchestrator.sources.jsonl import (
    MAX_ID_BYTES,
    MAX_LINE,
    is_rotation_of,
    parse_record,
    show_raw,
    split_lines,
)
from orchestrator.sources.ops import op_ingest_records, op_source_position
from orchestrator.store.records import ItemState, NewItem
from orchestrator.store.sqlite import connect
from orchestrator.supervisor import serve

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable
    from pathlib import Path

    from orchestrator.config import Config


def source(tmp_path: Path, position: Position | None = None, **keys: object) -> JsonlSource:
    data = {
        "sources": [{"name": "log", "type": "jsonl", "path": "log.jsonl", "route": ["s"],
                     "poll_interval": "100ms", **keys}],
        "stages": [{"name": "s", "command": ["true"]}],
    }  # fmt: skip
    return JsonlSource(parse_config(data, base_dir=tmp_path).sources[0], position)


def drain(src: JsonlSource, *, hurry: bool = False) -> list[NewItem]:
    """Read until the source says there is nothing more now, as a poll does (no store)."""
    items: list[NewItem] = []
    while True:
        step = src.read(hurry)
        items += [item for item, _ in step.records]
        src.apply(step)
        if not step.more:
            return items


def numbers(items: list[NewItem]) -> list[int]:
    return [json.loads(i.payload or "null")["n"] for i in items if i.state is ItemState.QUEUED]


def append(path: Path, *records: object, raw: bytes = b"") -> None:
    with open(path, "ab") as f:
        for r in records:
            f.write(json.dumps(r).encode() + b"\n")
        f.write(raw)


# --- pure -----------------------------------------------------------------------------------


def test_split_lines_keeps_a_half_line_for_later_and_numbers_lines() -> None:
    data = b'{"a":1}\n\n{"b":2}\n{"c"'
    lines, used = split_lines(data, 100, 7, limit=10)
    assert [(ln.offset, ln.number, ln.raw) for ln in lines] == [
        (100, 8, b'{"a":1}'), (108, 9, b""), (109, 10, b'{"b":2}'),
    ]  # fmt: skip
    assert used == 17
    # The limit cuts after whole lines; `final` takes a last line without its newline.
    assert split_lines(data, 0, 0, limit=1)[1] == 8
    lines, used = split_lines(data, 0, 0, limit=10, final=True)
    assert (lines[-1].raw, used) == (b'{"c"', len(data))


def test_parse_record_accepts_objects_and_says_what_is_wrong_otherwise() -> None:
    assert parse_record(b'  {"n": 1}\r', None) == ('{"n": 1}', None)
    assert parse_record(b"   ", None) is None
    assert parse_record(b'{"id": "x-1"}', "id") == ('{"id": "x-1"}', "x-1")
    assert parse_record(b'{"id": 42}', "id") == ('{"id": 42}', "42")
    cases = {
        b'{"n": ': "not valid JSON (Expecting value: line 1 column 7 (char 6))",
        b"[1, 2]": "not a JSON object but an array",
        b'"text"': "not a JSON object but a string",
        b"\xff\xfe{}": "not UTF-8 text (invalid start byte at byte 0)",
    }
    for raw, message in cases.items():
        with pytest.raises(ValueError) as info:
            parse_record(raw, None)
        assert str(info.value) == message
    for raw, message in {
        b'{"n": 1}': "no 'id' field",
        b'{"id": null}': "'id' must be a string or an integer, not null",
        b'{"id": true}': "'id' must be a string or an integer, not a boolean",
        b'{"id": ""}': "'id' is empty",
    }.items():
        with pytest.raises(ValueError) as info:
            parse_record(raw, "id")
        assert str(info.value) == message


def test_a_byte_order_mark_before_a_record_is_not_part_of_it() -> None:
    # Found in session 6: a file whose writer put a UTF-8 BOM first had its first record
    # rejected ("Unexpected UTF-8 BOM").
    assert parse_record(b'\xef\xbb\xbf{"id": "a", "v": 1}', "id") == ('{"id": "a", "v": 1}', "a")


def test_show_raw_escapes_and_caps() -> None:
    assert show_raw(b"ok\x1b[31m\n") == "b'ok\\x1b[31m\\n'"
    assert show_raw(b"x" * 10, limit=4) == "b'xxxx' (first 4 of 10 bytes)"


# --- real files -----------------------------------------------------------------------------


def test_appends_while_reading_and_a_half_line_completed_later(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    src = source(tmp_path)
    assert drain(src) == []  # no file yet
    append(log, {"n": 1}, {"n": 2}, raw=b'{"n": ')
    first = drain(src)
    assert numbers(first) == [1, 2]
    assert src.stored == Position(log.stat().st_dev, log.stat().st_ino, 18)
    # The half line waits; once its newline is there it is one record, read once.
    assert drain(src) == []
    append(log, raw=b"3")
    assert drain(src) == []
    append(log, raw=b'}\n{"n": 4}\n')
    assert numbers(drain(src)) == [3, 4]
    # Ids: source, inode and offset; the record is the payload.
    assert first[0].id == f"log:{log.stat().st_ino}:0"
    assert first[1].key == f"{log.stat().st_ino}:9"
    assert first[1].payload == '{"n": 2}'


def test_malformed_lines_become_rejected_items_and_reading_goes_on(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"n": 1}\nnot json\n\n[1]\n{"n": 2}\n\xff\x00\x1b\n')
    items = drain(source(tmp_path))
    assert numbers(items) == [1, 2]
    rejected = [i for i in items if i.state is ItemState.REJECTED]
    assert [r.reason for r in rejected] == [
        f"line 2 (byte 9) of {log}: not valid JSON (Expecting value: line 1 column 1 (char 0));"
        " raw: b'not json'",
        f"line 4 (byte 19) of {log}: not a JSON object but an array; raw: b'[1]'",
        f"line 6 (byte 32) of {log}: not UTF-8 text (invalid start byte at byte 0);"
        " raw: b'\\xff\\x00\\x1b'",
    ]
    assert all(r.payload is None and r.route == ("s",) for r in rejected)


def test_a_line_longer_than_a_read_is_rejected_with_its_head(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl_module, "MAX_LINE", 64)
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"n": 1}\n' + b"x" * 200)
    src = source(tmp_path)
    assert numbers(drain(src)) == [1]
    append(log, {"n": 2}, raw=b'\n{"n": 3}\n')
    items = drain(src)
    assert numbers(items) == [3]
    [long] = [i for i in items if i.state is ItemState.REJECTED]
    assert long.reason is not None
    assert long.reason.startswith(
        f"line 2 (byte 9) of {log}: longer than 64 bytes (208 bytes); raw: b'xxx"
    )


def test_truncation_restarts_at_zero_with_a_warning(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1}, {"n": 2})
    src = source(tmp_path)
    assert numbers(drain(src)) == [1, 2]
    # Truncated to nothing, then a shorter content: size below the offset.
    log.write_bytes(b"")
    append(log, {"n": 3})
    assert numbers(drain(src)) == [3]
    # Truncated and grown back past the offset between two polls -- even with lines of the
    # same length: caught by the bytes before the offset.
    offset = src.offset
    log.write_bytes(b"")
    append(log, {"n": 4}, {"n": 5}, {"n": 6})
    assert log.stat().st_size > offset
    assert numbers(drain(src)) == [4, 5, 6]


def test_rotation_finishes_the_old_file_through_its_descriptor(tmp_path: Path) -> None:
    # Given: a writer holding the file open.
    log = tmp_path / "log.jsonl"
    writer = open(log, "ab", buffering=0)
    try:
        writer.write(b'{"n": 1}\n')
        src = source(tmp_path)
        assert numbers(drain(src)) == [1]
        old_inode = log.stat().st_ino

        # When: the file is renamed away, a new one started at the path, and the writer still
        # appends to the old one (it has not reopened yet) -- all before the next poll.
        os.rename(log, tmp_path / "log.jsonl.1")
        append(log, {"n": 10})
        writer.write(b'{"n": 2}\n{"n": 3}\n')
        first = drain(src)
        # The old file is read to its end, and followed until it has been quiet for a poll.
        writer.write(b'{"n": 4}\n')
        time.sleep(0.06)
        second = drain(src)
    finally:
        writer.close()
    time.sleep(0.06)
    third = drain(src)

    # Then: every record exactly once, the old file's first, then the new file's.
    assert numbers(first + second + third) == [2, 3, 4, 10]
    assert src.stored == Position(log.stat().st_dev, log.stat().st_ino, 10)
    keys = [i.key for i in first + second + third]
    assert keys[0].startswith(f"{old_inode}:")
    assert keys[-1] == f"{log.stat().st_ino}:0"


def test_a_rotated_file_ending_in_a_half_line_gives_it_as_its_last_record(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"n": 1}\n{"n": 2}')
    src = source(tmp_path)
    assert numbers(drain(src)) == [1]
    os.rename(log, tmp_path / "old.jsonl")
    append(log, {"n": 3})
    assert numbers(drain(src, hurry=True)) == [2, 3]


def test_restart_resumes_at_the_stored_position_even_after_rotation(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1}, {"n": 2})
    src = source(tmp_path)
    assert numbers(drain(src)) == [1, 2]
    stored = src.stored
    src.close()
    # While stopped: more appended, then the file rotated and a new one begun.
    append(log, {"n": 3}, raw=b"broken\n")
    os.rename(log, tmp_path / "log.jsonl.1")
    append(log, {"n": 4})

    again = source(tmp_path, stored)
    items = drain(again, hurry=True)
    assert numbers(items) == [3, 4]
    [bad] = [i for i in items if i.state is ItemState.REJECTED]
    assert bad.reason is not None
    assert bad.reason.startswith(f"line 4 (byte 27) of {tmp_path / 'log.jsonl.1'}:")
    again.close()


def test_restart_without_the_old_file_warns_and_reads_the_new_one(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1})
    src = source(tmp_path)
    drain(src)
    stored = src.stored
    src.close()
    (tmp_path / "archive").mkdir()
    os.rename(log, tmp_path / "archive" / "log.jsonl")  # not beside the path: not found
    append(log, {"n": 2})
    again = source(tmp_path, stored)
    assert numbers(drain(again)) == [2]
    again.close()


def test_id_field_gives_ids_and_rejects_records_without_one(tmp_path: Path) -> None:
    log = tmp_path / "log.jsonl"
    append(log, {"id": "QA-1", "n": 1}, {"n": 2}, {"id": 7, "n": 3})
    items = drain(source(tmp_path, id_field="id"))
    assert [(i.id, i.key, i.state.value) for i in items] == [
        ("log:QA-1", "QA-1", "queued"),
        # (its place, marked with NUL, which no id holds: a record whose id is "<inode>:23"
        # is another; found by an acceptance tester, session 16)
        (f"log:\x00{log.stat().st_ino}:23", f"\x00{log.stat().st_ino}:23", "rejected"),
        ("log:7", "7", "queued"),
    ]
    assert items[1].reason is not None
    assert "no 'id' field" in items[1].reason
    # A record whose id spells the rejected line's place is taken, not skipped as a repeat.
    append(log, {"id": f"{log.stat().st_ino}:23"})
    again = source(tmp_path, id_field="id")
    assert [i.key for i in drain(again)][-1] == f"{log.stat().st_ino}:23"


def test_a_large_backlog_is_read_in_bounded_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(jsonl_module, "STEP_RECORDS", 7)
    log = tmp_path / "log.jsonl"
    append(log, *({"n": n} for n in range(50)))
    src = source(tmp_path)
    sizes = []
    while True:
        step = src.read()
        sizes.append(len(step.records))
        src.apply(step)
        if not step.more:
            break
    assert sizes == [7] * 7 + [1]
    assert step.at_end


# --- the store operation ----------------------------------------------------------------------


def test_ingest_records_stores_the_position_and_never_drops_a_positional_record(
    tmp_path: Path,
) -> None:
    conn = connect(tmp_path / "store.db")
    try:

        def new(key: str, *, positional: bool) -> tuple[NewItem, bool]:
            item = NewItem(id=f"log:{key}", source="log", key=key, route=("s",), payload="{}")
            return item, positional

        conn.execute("BEGIN")
        added = op_ingest_records(
            conn, "log", [new("7:0", positional=True), new("QA-1", positional=False)],
            Position(1, 7, 20),
        )  # fmt: skip
        conn.execute("COMMIT")
        assert [i.key for i in added] == ["7:0", "QA-1"]
        assert op_source_position(conn, "log") == Position(1, 7, 20)
        # After a truncation the same place holds a new record: it gets a suffix, not dropped.
        # A record whose id was taken is skipped.
        conn.execute("BEGIN")
        again = op_ingest_records(
            conn, "log", [new("7:0", positional=True), new("QA-1", positional=False),
                          new("7:0", positional=True)],
            Position(1, 7, 9),
        )  # fmt: skip
        conn.execute("COMMIT")
        assert [(i.id, i.key) for i in again] == [("log:7:0~2", "7:0~2"), ("log:7:0~3", "7:0~3")]
        assert op_source_position(conn, "log") == Position(1, 7, 9)
        assert op_source_position(conn, "other") is None
    finally:
        conn.close()


def test_a_file_rewritten_under_the_same_inode_while_stopped_is_read_from_its_start(
    tmp_path: Path,
) -> None:
    # Given: a log read to its end, its position (with the bytes before it) stored.
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1, "p": "a" * 40}, {"n": 2, "p": "b" * 40})
    first = source(tmp_path)
    assert numbers(drain(first)) == [1, 2]
    stored = first.stored
    assert stored is not None
    assert stored.tail.endswith(b'"}\n')
    first.close()
    # When: while the service is stopped, the file is rewritten in place (same inode) with new
    # records that happen to have a line end exactly at the stored offset.
    inode = log.stat().st_ino
    with open(log, "r+b") as f:
        f.truncate(0)
        filler = b"x" * (stored.offset - len(b'{"n": 3}\n') - len(b'{"n": 4, "p": "') - 3)
        f.write(b'{"n": 3}\n' + b'{"n": 4, "p": "' + filler + b'"}\n')
        f.write(json.dumps({"n": 5}).encode() + b"\n")
    assert log.stat().st_ino == inode
    assert log.read_bytes()[stored.offset - 1 : stored.offset] == b"\n"
    # Then: the restarted source sees the bytes before its offset changed and reads it all.
    again = source(tmp_path, stored)
    assert numbers(drain(again)) == [3, 4, 5]


def test_nan_and_infinity_are_not_json_and_their_record_is_rejected() -> None:
    # Found in session 6: Python reads them, so the record ran with a payload that a stage's
    # strict JSON parser refused on every attempt.
    for constant in ("NaN", "Infinity", "-Infinity"):
        with pytest.raises(ValueError) as info:
            parse_record(b'{"id": "a", "v": ' + constant.encode() + b"}", "id")
        assert str(info.value) == f"not valid JSON ({constant} is not a JSON number)"
    # A number too large for a float reads as infinity (the json source rejected it; this one
    # took it: acceptance, issue 2). One too small reads as 0 and is kept, as are big integers.
    for number in ("1e999", "-1E+400", "1.5e309"):
        with pytest.raises(ValueError) as info:
            parse_record(b'{"id": "a", "v": [' + number.encode() + b"]}", "id")
        sign = "-" if number.startswith("-") else ""
        assert str(info.value) == (
            f"number {number} is out of range (it reads as {sign}infinity, which JSON has no"
            " number for)"
        )
    kept = b'{"id": "a", "v": [1e-999, 1e308, ' + b"9" * 400 + b"]}"
    assert parse_record(kept, "id") == (kept.decode(), "a")


def test_a_record_holding_1e999_is_rejected_and_the_lines_after_it_are_read(
    tmp_path: Path,
) -> None:
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"n": 1}\n{"n": 2, "v": 1e999}\n{"n": 3, "v": NaN}\n{"n": 4, "v": 2.5}\n')
    items = drain(source(tmp_path))
    assert numbers(items) == [1, 4]
    assert [i.reason for i in items if i.state is ItemState.REJECTED] == [
        f"line 2 (byte 9) of {log}: number 1e999 is out of range (it reads as infinity, which"
        """ JSON has no number for); raw: b'{"n": 2, "v": 1e999}'""",
        f"line 3 (byte 30) of {log}: not valid JSON (NaN is not a JSON number);"
        """ raw: b'{"n": 3, "v": NaN}'""",
    ]


def test_an_id_too_long_to_give_a_stage_is_rejected_and_integers_are_their_digits() -> None:
    # Found in session 6: a 200 KB id failed every run ("Argument list too long") and died.
    long_id = "x" * (MAX_ID_BYTES + 1)
    with pytest.raises(ValueError) as info:
        parse_record(json.dumps({"id": long_id}).encode(), "id")
    assert str(info.value) == (
        f"'id' is {MAX_ID_BYTES + 1} bytes long; a stage can be given an id of at most "
        f"{MAX_ID_BYTES} bytes"
    )
    wide = "é" * (MAX_ID_BYTES // 2 + 1)  # two bytes each: over the limit in bytes
    with pytest.raises(ValueError, match="bytes long"):
        parse_record(json.dumps({"id": wide}, ensure_ascii=False).encode(), "id")
    assert parse_record(json.dumps({"id": "y" * MAX_ID_BYTES}).encode(), "id") is not None
    # 1 and "1" are one id (documented): the second record is the first one's duplicate.
    assert parse_record(b'{"id": 1}', "id") == ('{"id": 1}', "1")
    assert parse_record(b'{"id": "1"}', "id") == ('{"id": "1"}', "1")


def test_an_id_holding_nul_or_a_lone_surrogate_is_rejected_with_its_line(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): an id with "\u0000" was taken and then could
    # never run (no argument can hold NUL); one with a lone surrogate was rejected by the store
    # without the line it came from.
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"id": "a\\u0000b"}\n{"id": "c\\ud800"}\n{"id": "fine"}\n')
    items = drain(source(tmp_path, id_field="id"))
    assert [i.key for i in items if i.state is ItemState.QUEUED] == ["fine"]
    assert [i.reason for i in items if i.state is ItemState.REJECTED] == [
        f"line 1 (byte 0) of {log}: 'id' holds a NUL character (\\u0000), which no program can"
        """ be given in its arguments or environment; raw: b'{"id": "a\\\\u0000b"}'""",
        f"line 2 (byte 19) of {log}: 'id' holds '\\ud800', a lone UTF-16 surrogate, which is"
        """ not valid UTF-8 text (the store cannot hold it); raw: b'{"id": "c\\\\ud800"}'""",
    ]


def test_a_line_of_exactly_4_mib_is_taken_and_a_longer_one_rejected(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): a line of exactly 4 MiB was rejected as
    # "longer than 4194304 bytes (4194304 bytes)"; the README says longer than 4 MiB.
    log = tmp_path / "log.jsonl"
    head = b'{"n": 1, "v": "'
    exact = head + b"x" * (MAX_LINE - len(head) - 2) + b'"}'
    assert len(exact) == MAX_LINE == 4 << 20
    log.write_bytes(exact + b"\n" + exact[:-2] + b'x"}\n' + b'{"n": 3}\n')
    items = drain(source(tmp_path))
    assert [json.loads(i.payload or "")["n"] for i in items if i.payload] == [1, 3]
    [long] = [i for i in items if i.state is ItemState.REJECTED]
    assert long.reason is not None
    assert long.reason.startswith(
        f"line 2 (byte {MAX_LINE + 1}) of {log}: longer than 4 MiB ({MAX_LINE + 1} bytes); raw:"
    )


# --- rotations the source did not see, files rewritten in place ----------------------------


def drain_into(conn: sqlite3.Connection, src: JsonlSource, *, hurry: bool = True) -> list[str]:
    """Read and ingest as a poll does, into a real store: the ids of the items added."""
    added: list[str] = []
    while True:
        step = src.read(hurry)
        if step.records or step.position is not None:
            conn.execute("BEGIN")
            added += [i.id for i in op_ingest_records(conn, src.name, step.records, step.position,
                                                      again=step.again)]  # fmt: skip
            conn.execute("COMMIT")
        src.apply(step)
        if not step.more:
            return added


def rotate(log: Path, to: str, *records: object) -> None:
    """Rename ``log`` to ``to`` beside it and start a new one holding ``records``."""
    os.rename(log, log.with_name(to))
    append(log, *records)


def test_two_rotations_between_two_reads_read_the_file_in_the_middle(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): the file rotated in and out again between two
    # reads was never read, with no word (the source went from the file it had read to the one
    # at the path).
    # Given: a writer holding the file open, read to its end.
    log = tmp_path / "log.jsonl"
    writer = open(log, "ab", buffering=0)
    try:
        writer.write(b'{"n": 1}\n')
        src = source(tmp_path)
        assert numbers(drain(src)) == [1]

        # When: before the next poll, the file is rotated twice (the writer appends to the
        # first one still), an old rotated file and others beside it untouched for an hour.
        old = tmp_path / "log.jsonl.7"
        append(old, {"n": -1})
        for name in ("log.jsonl.7", "log.jsonl.gz", "other.jsonl"):
            (tmp_path / name).touch()
            os.utime(tmp_path / name, (time.time() - 3600, time.time() - 3600))
        rotate(log, "log.jsonl.1", {"n": 10}, {"n": 11})
        writer.write(b'{"n": 2}\n')
        rotate(log, "log.jsonl-20260102", {"n": 20})
        time.sleep(0.06)  # quiet for half a poll
        first = drain(src)
        time.sleep(0.06)
        second = drain(src)
        time.sleep(0.06)
        third = drain(src)
    finally:
        writer.close()

    # Then: every record once, file after file; the old files are left alone.
    assert numbers(first + second + third) == [2, 10, 11, 20]
    assert src.stored == Position(log.stat().st_dev, log.stat().st_ino, 10)


def test_rotations_named_by_logrotates_extension_option_are_read_too(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): with logrotate's `extension .jsonl` the files
    # are rotated to `log.1.jsonl` or `log-20260102.jsonl`, which were not looked for: the file
    # in the middle of two rotations between two reads was never read.
    # Given: a writer holding the file open, read to its end; a writer's own other files beside.
    log = tmp_path / "log.jsonl"
    writer = open(log, "ab", buffering=0)
    try:
        writer.write(b'{"n": 1}\n')
        src = source(tmp_path)
        assert numbers(drain(src)) == [1]
        append(tmp_path / "log-2.jsonl", {"n": -2})  # a shard, not a rotation
        append(tmp_path / "log-20260101.jsonl.gz", {"n": -3})

        # When: before the next poll, the file is rotated twice as `extension` names them.
        rotate(log, "log-20260102.jsonl", {"n": 10}, {"n": 11})
        writer.write(b'{"n": 2}\n')
        rotate(log, "log.1.jsonl", {"n": 20})
        items: list[NewItem] = []
        for _ in range(3):
            time.sleep(0.06)  # quiet for half a poll
            items += drain(src)
    finally:
        writer.close()

    # Then: every record once, file after file; the others are left alone.
    assert numbers(items) == [2, 10, 11, 20]


def test_the_names_a_rotation_gives() -> None:
    rotated = ["log.jsonl.1", "log.jsonl-20260102", "log.jsonl.2026-01-02", "log.jsonl_3",
               "log.1.jsonl", "log-20260102.jsonl", "log_2026-01-02.jsonl", "log-2026010212.jsonl"]  # fmt: skip
    assert [n for n in rotated if not is_rotation_of(n, "log.jsonl")] == []
    others = ["log.jsonl", "log.jsonl.lock", "log-2.jsonl", "log.x.jsonl", "log.jsonl.1.gz",
              "log-20260102.jsonl.gz", "other.1.jsonl", "log.jsonlx.1"]  # fmt: skip
    assert [n for n in others if is_rotation_of(n, "log.jsonl")] == []


async def test_a_batch_after_two_rotations_takes_every_file_and_one_after_a_loss_exits_1(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a batch has read the log; two rotations follow before the next batch (the
    # acceptance tester's reproduction: tue-1 and tue-2 were never taken).
    config = write_config("""
        [http]
        listen = false
        [[sources]]
        name = "log"
        type = "jsonl"
        path = "app.jsonl"
        id_field = "id"
        route = ["s"]
        [[stages]]
        name = "s"
        command = ["true"]
        """)  # fmt: skip
    log = tmp_path / "app.jsonl"
    append(log, {"id": "mon-1"})
    assert (await serve(config, batch=True)).tally.done == 1
    append(log, {"id": "mon-2"})
    rotate(log, "app.jsonl.1", {"id": "tue-1"}, {"id": "tue-2"})
    rotate(log, "app.jsonl.2", {"id": "wed-1"})

    # When
    result = await serve(config, batch=True)

    # Then: all four new records done, and the batch is a success.
    assert result.tally.done == 4
    assert result.failed_sources == {}

    # When: the file it read is rotated out of the folder before the next batch.
    append(log, {"id": "wed-2"})
    (tmp_path / "archive").mkdir()
    os.rename(log, tmp_path / "archive" / "app.jsonl")
    append(log, {"id": "thu-1"})
    result = await serve(config, batch=True)

    # Then: the new file is read, and the batch says records may be lost (exit 1).
    assert result.tally.done == 1
    assert list(result.failed_sources) == ["log"]
    assert "is no longer at" in result.failed_sources["log"]


def test_a_file_read_again_after_a_restart_gives_no_record_twice(tmp_path: Path) -> None:
    # Given: a source without id_field (records keyed by inode and offset) that followed two
    # rotations, then stopped.
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1}, raw=b"broken\n")
    conn = connect(tmp_path / "store.db")
    try:
        src = source(tmp_path)
        assert len(drain_into(conn, src)) == 2
        rotate(log, "log.jsonl.1", {"n": 2})
        rotate(log, "log.jsonl.2", {"n": 3})
        assert len(drain_into(conn, src)) == 2
        src.close()
        # When: two more rotations while stopped, within the second the files read were last
        # written (so those look modified since it last saw its file, and are read again).
        rotate(log, "log.jsonl.3", {"n": 4})
        rotate(log, "log.jsonl.4", {"n": 5})
        again = source(tmp_path, op_source_position(conn, "log"))
        added = drain_into(conn, again)
        again.close()
        # Then: only the two new records are added: the ones read again are known.
        inode = {n: (tmp_path / f"log.jsonl.{n}").stat().st_ino for n in (3, 4)}
        assert added == [f"log:{inode[4]}:0", f"log:{log.stat().st_ino}:0"]
        [count] = conn.execute("SELECT count(*) FROM items").fetchone()
        assert count == 6
    finally:
        conn.close()


def test_ingest_again_skips_a_positional_record_only_when_it_is_the_same(tmp_path: Path) -> None:
    conn = connect(tmp_path / "store.db")
    try:

        def new(key: str, payload: str | None) -> tuple[NewItem, bool]:
            state = ItemState.QUEUED if payload is not None else ItemState.REJECTED
            item = NewItem(id=f"log:{key}", source="log", key=key, route=("s",), payload=payload,
                           state=state)  # fmt: skip
            return item, True

        conn.execute("BEGIN")
        op_ingest_records(conn, "log", [new("7:0", '{"n": 1}'), new("7:9", None)])
        added = op_ingest_records(
            conn, "log", [new("7:0", '{"n": 1}'), new("7:9", None), new("7:0", '{"n": 2}')],
            again=True,
        )  # fmt: skip
        conn.execute("COMMIT")
        # The same payload (or none, rejected) at the same place: the same record. Another one
        # there (the file's inode reused): a new record.
        assert [i.key for i in added] == ["7:0~2"]
    finally:
        conn.close()


def test_a_file_rewritten_with_lines_ending_alike_is_read_from_its_start(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): truncated and written again in place, with
    # records whose last 64 bytes are the same (a long shared field), the new records before
    # the old offset were never read.
    log = tmp_path / "ev.jsonl"
    shared = ', "source": "sensor-network-eu-west-1", "schema": "v2", "region": "eu-west-1"}\n'
    log.write_bytes(b"".join(f'{{"id": "a{n}"{shared}'.encode() for n in (1, 2, 3)))
    src = source(tmp_path, path="ev.jsonl", id_field="id")
    assert [i.key for i in drain(src)] == ["a1", "a2", "a3"]
    assert src.stored is not None
    assert src.stored.head == log.read_bytes()[:256]

    with open(log, "r+b") as f:  # same inode, same length per line
        f.truncate(0)
        f.write(b"".join(f'{{"id": "b{n}"{shared}'.encode() for n in (1, 2, 3, 4)))
    assert [i.key for i in drain(src)] == ["b1", "b2", "b3", "b4"]

    # And after a restart, by the head stored with the position.
    stored = src.stored
    src.close()
    log.write_bytes(b"".join(f'{{"id": "c{n}"{shared}'.encode() for n in (1, 2, 3, 4, 5)))
    assert [i.key for i in drain(source(tmp_path, stored, path="ev.jsonl", id_field="id"))] == [
        "c1", "c2", "c3", "c4", "c5",
    ]  # fmt: skip


def test_a_file_rewritten_in_place_with_as_many_bytes_is_read_again_once(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 17): rewritten in place (same inode) with as many
    # bytes, the file was read again from its start up to the same offset, but its new head
    # and tail were not stored with that offset: every later start found it "truncated" and
    # took its record again (log:<inode>:0~2, ~3, ...).
    # Given: a source without id_field that read one record into a real store.
    log = tmp_path / "log.jsonl"
    log.write_bytes(b'{"n": 1}\n')
    conn = connect(tmp_path / "store.db")
    try:
        first = source(tmp_path)
        assert len(drain_into(conn, first)) == 1
        first.close()
        # When: while it is stopped, the file is rewritten in place with as many bytes.
        inode = log.stat().st_ino
        with open(log, "r+b") as f:
            f.write(b'{"n": 3}\n')
        assert log.stat().st_ino == inode
        # Then: the next start reads the new record, once; the position stored with it is
        # the new file's, so three more starts find nothing new and nothing truncated.
        added: list[list[str]] = []
        with captured_logs("WARNING") as lines:
            for _ in range(4):
                src = source(tmp_path, op_source_position(conn, "log"))
                added.append(drain_into(conn, src))
                src.close()
        assert added == [[f"log:{inode}:0~2"], [], [], []]
        assert len([line for line in lines if "truncated" in line]) == 1
        stored = op_source_position(conn, "log")
        assert stored is not None
        assert stored.head == b'{"n": 3}\n'
    finally:
        conn.close()


def test_records_a_copytruncate_left_in_the_copy_only_are_read_from_it(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 17): logrotate's copytruncate copies the file
    # beside the path, then truncates it in place; the records appended after the last read
    # were in the copy only, and lost.
    # Given: a source without id_field that read one record into a real store, then stopped;
    # two more records are appended, the file is copied to log.jsonl.1 and truncated, and a
    # fourth record is appended.
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1})
    conn = connect(tmp_path / "store.db")
    try:
        first = source(tmp_path)
        assert len(drain_into(conn, first)) == 1
        first.close()
        append(log, {"n": 2}, {"n": 3})
        copy = tmp_path / "log.jsonl.1"
        copy.write_bytes(log.read_bytes())
        with open(log, "r+b") as f:
            f.truncate(0)
        append(log, {"n": 4})

        # When: the source starts again, and once more.
        added: list[list[str]] = []
        for _ in range(2):
            src = source(tmp_path, op_source_position(conn, "log"))
            added.append(drain_into(conn, src))
            src.close()

        # Then: the copy is read from the stored offset (records 2 and 3, keyed by its inode),
        # then the truncated file from its start (record 4); the second start adds nothing.
        at = {"copy": copy.stat().st_ino, "log": log.stat().st_ino}
        assert added == [
            [f"log:{at['copy']}:9", f"log:{at['copy']}:18", f"log:{at['log']}:0~2"], [],
        ]  # fmt: skip
        rows = conn.execute("SELECT payload FROM items ORDER BY seq").fetchall()
        assert [json.loads(r[0])["n"] for r in rows] == [1, 2, 3, 4]
    finally:
        conn.close()


def test_a_truncated_file_takes_no_rotated_file_that_is_not_its_copy(tmp_path: Path) -> None:
    # Given: a log read to its end, then truncated; beside it a longer file that does not hold
    # the log's first bytes (another one rotated away).
    log = tmp_path / "log.jsonl"
    append(log, {"n": 1})
    src = source(tmp_path)
    assert numbers(drain(src, hurry=True)) == [1]
    append(tmp_path / "log.jsonl.1", {"n": 7}, {"n": 8})
    log.write_bytes(b"")
    append(log, {"n": 2})
    # When / Then: only the truncated file is read again, from its start.
    assert numbers(drain(src, hurry=True)) == [2]
    src.close()

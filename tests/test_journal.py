"""The run journal on its own: what it writes, what it reads back, and when it lets go."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import pytest

from orchestrator import journal as journal_module
from orchestrator.errors import StoreUnavailable
from orchestrator.journal import JournalRun, RunJournal, read_journal
from orchestrator.runner import Outcome, RunResult

if TYPE_CHECKING:
    from pathlib import Path


def result(outcome: Outcome = Outcome.OK, code: int | None = 0) -> RunResult:
    return RunResult(outcome=outcome, exit_code=code, signal=None if code is not None else 9,
                     pid=1, duration=0.25, tail="", reason="")  # fmt: skip


def test_a_run_is_read_back_as_written_and_its_result_with_it(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = RunJournal.create(path, "host:1:abc")
    journal.started(7, 3, 2, "a stage with spaces")
    journal.started(8, 4, 1, "b")
    journal.ended(8, result(Outcome.KILLED, None))
    runs = read_journal(path)
    assert runs[7] == JournalRun(7, 3, 2, "a stage with spaces", runs[7].started, "host:1:abc")
    assert (runs[8].outcome, runs[8].exit_code, runs[8].signal, runs[8].duration) == (
        "killed", None, 9, 0.25,
    )  # fmt: skip
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    journal.close()
    assert path.exists()  # runs not yet durable in the store: kept for the next start


def test_a_journal_whose_runs_are_all_settled_is_removed_at_close(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    journal = RunJournal.create(path, "i")
    journal.started(1, 1, 1, "s")
    journal.ended(1, result())
    journal.settled(1)
    journal.close()
    assert not path.exists()
    assert read_journal(path) is None  # no journal: the last stop was clean


def test_a_line_cut_short_or_unknown_is_passed_over(tmp_path: Path) -> None:
    path = tmp_path / "journal"
    path.write_bytes(
        b"orchestrator run journal 1 i\nS 1 2 1 100.5 s\nS 2 3\nX\nE 1 ok 0 - 0.5\nS 3 4 1 1"
    )
    runs = read_journal(path)
    assert list(runs) == [1]
    assert runs[1].outcome == "ok"


def test_a_long_journal_is_rewritten_with_the_runs_not_yet_settled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: a journal that compacts past 200 bytes; run 1 never settles.
    monkeypatch.setattr(journal_module, "JOURNAL_COMPACT_BYTES", 200)
    path = tmp_path / "journal"
    journal = RunJournal.create(path, "i")
    journal.started(1, 1, 1, "s")
    # When: many runs come and go
    for run in range(2, 40):
        journal.started(run, run, 1, "s")
        journal.ended(run, result())
        journal.settled(run)
    # Then: the file stays small and holds run 1 still, and appends go on after a rewrite.
    assert path.stat().st_size < 400
    journal.started(50, 5, 1, "s")
    held = read_journal(path)
    assert 1 in held
    assert 50 in held
    assert len(held) < 8  # (runs settled since the last rewrite stay until the next one)
    assert not (tmp_path / "journal.new").exists()
    journal.close()


def test_ids_sqlite_cannot_hold_are_passed_over(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 17): a line with run id 2**63 made run ids go on
    # after it, and every start crashed at its first claim.
    path = tmp_path / "journal"
    path.write_bytes(
        b"S 9223372036854775808 1 1 1.0 s\nS 0 1 1 1.0 s\nS -3 1 1 1.0 s\nS 5 1 1 1.0 s\n"
    )
    assert list(read_journal(path) or {}) == [5]


def test_a_journal_that_is_a_fifo_is_refused_at_once(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 17): opening it waited for a writer for ever.
    path = tmp_path / "journal"
    os.mkfifo(path)
    with pytest.raises(StoreUnavailable, match="it is not a regular file"):
        read_journal(path)


def test_a_line_after_one_a_full_disk_cut_short_is_not_glued_to_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: a journal whose next write is cut short (the disk full in the middle of it)
    path = tmp_path / "journal"
    journal = RunJournal.create(path, "i")
    real_write = os.write
    cut = [True]

    def write(fd: int, data: bytes) -> int:
        if cut and cut.pop():
            return real_write(fd, data[:5])
        return real_write(fd, data)

    monkeypatch.setattr(journal_module.os, "write", write)
    # When: a run is written down (cut), then another (room again)
    journal.started(1, 1, 1, "s")
    journal.started(2, 2, 1, "s")
    # Then: the second is read back whole
    assert list(read_journal(path) or {}) == [2]
    journal.close()

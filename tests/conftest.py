from __future__ import annotations

import contextlib
import errno
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest

from orchestrator import pollers
from orchestrator.config import load_config
from orchestrator.store import NewItem, connect
from orchestrator.store.sqlite import op_ingest

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from orchestrator.config import Config, SourceConfig

PROGRAMS = Path(__file__).parent / "programs"
PY = sys.executable

S = TypeVar("S")


def left_queued(state_dir: Path, items: list[NewItem]) -> None:
    """A store as an earlier service left it: ``items`` ingested (queued), nothing run yet."""
    state_dir.mkdir(mode=0o700, exist_ok=True)
    conn = connect(state_dir / "orchestrator.db", create=True)
    try:
        with conn:
            op_ingest(conn, items)
    finally:
        conn.close()


def capture_sources(monkeypatch: pytest.MonkeyPatch, kind: Callable[..., S]) -> list[S]:
    """The source objects the services of a test make (of ``kind``), in order."""
    made: list[S] = []

    def make_source(source: SourceConfig) -> S:
        made.append(kind(source, set()))
        return made[-1]

    monkeypatch.setattr(pollers, "make_source", make_source)
    return made


@contextlib.contextmanager
def open_db(path: str | os.PathLike[str], **kwargs: float) -> Iterator[sqlite3.Connection]:
    """A connection to a test's store, committed and closed at the end of the block.

    sqlite3's own ``with`` only commits: the file stayed open until the garbage collector came
    by, in the middle of a later test that compares the process's open descriptors.
    """
    conn = sqlite3.connect(path, **kwargs)
    try:
        with conn:
            yield conn
    finally:
        conn.close()


@pytest.fixture
def write_config(tmp_path: Path) -> Callable[[str], Config]:
    """Write a TOML config into tmp_path and load it."""

    def write(text: str, name: str = "orchestrator.toml") -> Config:
        path = tmp_path / name
        path.write_text(textwrap.dedent(text))
        return load_config(path)

    return write


def pids_alive(pids: list[int]) -> list[int]:
    """The pids among ``pids`` that still exist and are not zombies."""
    alive = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):  # gone before or while read
            continue
        if state != "Z":
            alive.append(pid)
    return alive


def processes_with_env(marker: str) -> list[int]:
    """Pids of live processes whose environment contains ``marker`` (e.g. ``ORCH_INSTANCE=x``)."""
    found = []
    needle = marker.encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = f.read().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(int(entry))
    return pids_alive(found)


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (root only): a disk that can really fill up. (Sync: see need_tool.)"""
    folder = tmp_path / "disk"
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    else:
        folder.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs",
                               str(folder)], capture_output=True, text=True, check=False)  # fmt: skip
        if proc.returncode != 0:
            reason = f"cannot mount a tmpfs: {proc.stderr.strip()}"
    if reason is not None:
        message = f"{reason} (a store whose disk is full needs a small file system)"
        if os.environ.get("CI"):  # CI runs every test: a skip there is a failure
            pytest.fail(message)
        pytest.skip(message)
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as f, pytest.raises(OSError) as full:  # noqa: PT012
        while True:
            f.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    return filler

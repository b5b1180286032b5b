from __future__ import annotations

import os
from typing import TYPE_CHECKING

from orchestrator.config import parse_config
from orchestrator.sources import DirectorySource

if TYPE_CHECKING:
    from pathlib import Path


def source(tmp_path: Path, **keys: object) -> DirectorySource:
    data = {
        "sources": [{"name": "in", "type": "directory", "path": "in", "route": ["s"], **keys}],
        "stages": [{"name": "s", "command": ["true"]}],
    }
    return DirectorySource(parse_config(data, base_dir=tmp_path).sources[0], set())


def test_scan_matches_patterns_skips_ignored_and_survives_a_missing_folder(tmp_path: Path) -> None:
    src = source(tmp_path, pattern=["*.pdf", "*.txt"])
    assert src.scan() == []  # no folder yet
    (tmp_path / "in").mkdir()
    for name in ("a.pdf", "b.txt", "c.jpg", ".hidden.pdf", "d.pdf.tmp", "e.part", "new\nline.txt"):
        (tmp_path / "in" / name).write_text("x")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "deep.pdf").write_text("x")
    assert sorted(f.key for f in src.scan()) == ["a.pdf", "b.txt", "new\nline.txt"]
    deep = source(tmp_path, pattern="*.pdf", recursive=True)
    assert sorted(f.key for f in deep.scan()) == ["a.pdf", "sub/deep.pdf"]


def test_a_file_is_taken_once_it_has_settled(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "growing.dat"
    f.write_text("part")
    now_wall = f.stat().st_mtime
    src = source(tmp_path, settle="2s")
    # Seen for the first time, modified just now: not yet.
    assert src.select(src.scan(), now=100.0, wall=now_wall + 0.1) == []
    assert src.unsettled == 1
    # It grows: the clock restarts.
    f.write_text("part and more")
    os.utime(f, (now_wall + 1, now_wall + 1))
    assert src.select(src.scan(), now=101.0, wall=now_wall + 1.1) == []
    # Unchanged for 2 s: taken.
    [item] = src.select(src.scan(), now=103.1, wall=now_wall + 1.5)
    assert (item.id, item.key, item.route) == ("in:growing.dat", "growing.dat", ("s",))
    assert src.unsettled == 0


def test_old_files_are_taken_at_once_and_known_keys_never_again(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "old").write_text("x")
    os.utime(tmp_path / "in" / "old", (1000, 1000))
    src = source(tmp_path, settle="2s")
    [item] = src.select(src.scan())
    src.accepted([item.key])
    assert src.select(src.scan()) == []

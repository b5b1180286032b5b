"""The directory source without a store: scanning, settling, keys, dispositions (real files)."""

from __future__ import annotations

import errno
import os
import time
from typing import TYPE_CHECKING

from orchestrator.config import parse_config
from orchestrator.sources import DirectorySource, directory
from orchestrator.sources.directory import Disposed, free_name, move_no_clobber
from orchestrator.store.records import Item, ItemState

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

    from orchestrator.store.records import NewItem


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
    assert sorted(f.rel for f in src.scan()) == ["a.pdf", "b.txt", "new\nline.txt"]
    deep = source(tmp_path, pattern="*.pdf", recursive=True)
    assert sorted(f.rel for f in deep.scan()) == ["a.pdf", "sub/deep.pdf"]


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


# --- reingest_changed -----------------------------------------------------------------------


def test_a_rewritten_file_is_new_only_with_reingest_changed(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "doc.txt"
    f.write_text("v1")
    os.utime(f, (1000, 1000))
    plain, changed = source(tmp_path), source(tmp_path, reingest_changed=True)
    [a] = plain.select(plain.scan())
    [b] = changed.select(changed.scan())
    assert (a.id, a.key) == ("in:doc.txt", "doc.txt")
    assert (b.id, b.key) == ("in:doc.txt@2:1000000000000", "doc.txt@2:1000000000000")
    plain.accepted([a.key])
    changed.accepted([b.key])
    # Rewritten with new content: only the reingest_changed source takes it again.
    f.write_text("version 2")
    os.utime(f, (2000, 2000))
    assert plain.select(plain.scan()) == []
    [b2] = changed.select(changed.scan())
    assert b2.key == "doc.txt@9:2000000000000"
    changed.accepted([b2.key])
    assert changed.select(changed.scan()) == []


# --- dispositions -----------------------------------------------------------------------------


def item_of(new: NewItem, state: ItemState) -> Item:
    return Item(
        seq=1, id=new.id, source=new.source, key=new.key, route=new.route, path=new.path,
        payload=None, stage_index=0, state=state, attempts=1, interruptions=0,
        not_before=None, reason=None, created_at=0.0, updated_at=0.0,
    )  # fmt: skip


def test_move_keeps_the_relative_path_creates_the_folder_and_never_overwrites(
    tmp_path: Path,
) -> None:
    (tmp_path / "in" / "sub").mkdir(parents=True)
    (tmp_path / "done" / "sub").mkdir(parents=True)
    (tmp_path / "done" / "sub" / "a.pdf").write_text("an older a.pdf")
    (tmp_path / "done" / "sub" / "a.1.pdf").write_text("and another")
    (tmp_path / "in" / "sub" / "a.pdf").write_text("new")
    (tmp_path / "in" / "README").write_text("readme")
    src = source(tmp_path, recursive=True, on_done="move:done", on_dead="move:failed")
    new = {n.key: n for n in src.select(src.scan(), wall=time.time() + 60)}

    moved = str(tmp_path / "done" / "sub" / "a.2.pdf")
    assert src.dispose(item_of(new["sub/a.pdf"], ItemState.DONE)) == Disposed(
        f"moved 'sub/a.pdf' to {moved!r}", moved_to=moved
    )
    assert src.dispose(item_of(new["README"], ItemState.DEAD)) is not None
    assert (tmp_path / "done" / "sub" / "a.pdf").read_text() == "an older a.pdf"
    assert (tmp_path / "done" / "sub" / "a.1.pdf").read_text() == "and another"
    assert (tmp_path / "done" / "sub" / "a.2.pdf").read_text() == "new"
    assert (tmp_path / "failed" / "README").read_text() == "readme"
    assert sorted(p.name for p in (tmp_path / "in").rglob("*")) == ["sub"]
    # Gone already (moved by an earlier pass): nothing to do, no error.
    assert src.dispose(item_of(new["README"], ItemState.DEAD)) is None


def test_delete_and_keep(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x").write_text("x")
    src = source(tmp_path, on_done="delete")
    [new] = src.select(src.scan(), wall=time.time() + 60)
    src.accepted([new.key])
    assert src.dispose(item_of(new, ItemState.DEAD)) is None  # on_dead = keep
    assert (tmp_path / "in" / "x").exists()
    assert src.known == {"x"}
    assert src.dispose(item_of(new, ItemState.DONE)) == Disposed("deleted 'x'")
    assert not (tmp_path / "in" / "x").exists()
    assert src.known == set()


def test_the_known_keys_follow_what_the_folder_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A service that deletes or moves every file must not keep every name it ever took: a
    # key leaves memory once its file is gone (the store still holds it, and refuses it).
    (tmp_path / "in" / "sub").mkdir(parents=True)
    names = [f"f{i}" for i in range(5)] + ["sub/deep"]
    for name in names:
        (tmp_path / "in" / name).write_text(name)
    src = source(tmp_path, on_done="delete", recursive=True)
    new = {n.key: n for n in src.select(src.scan(), wall=time.time() + 60)}
    src.accepted(new)
    assert src.known == set(names)

    # Deleted by the disposition: forgotten at once. Deleted by someone else: at the next scan.
    assert src.dispose(item_of(new["f0"], ItemState.DONE)) == Disposed("deleted 'f0'")
    assert src.known == set(names) - {"f0"}
    (tmp_path / "in" / "f1").unlink()
    assert src.select(src.scan(), wall=time.time() + 60) == []
    assert src.known == set(names) - {"f0", "f1"}

    # A scan that could not list a folder forgets nothing: its files may still be there.
    (tmp_path / "in" / "sub" / "deep").unlink()
    listing = os.scandir

    def unreadable_sub(path: str) -> object:
        if path.endswith("sub"):
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return listing(path)

    monkeypatch.setattr(directory.os, "scandir", unreadable_sub)
    assert src.scan() == []
    assert "sub/deep" in src.known
    monkeypatch.setattr(directory.os, "scandir", listing)
    assert src.scan() == []
    assert src.known == {"f2", "f3", "f4"}

    # A file under a forgotten name is found again, as new: the store decides (it refuses the
    # key; see test_pollers). Nothing is taken on the source's memory alone.
    (tmp_path / "in" / "f0").write_text("a new f0")
    assert [f.rel for f in src.scan()] == ["f0"]


def test_a_file_a_disposition_takes_away_during_a_scan_is_not_remembered(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x").write_text("x")
    src = source(tmp_path, on_done="move:done")
    [new] = src.select(src.scan(), wall=time.time() + 60)

    class MovedWhenAsked(set[str]):
        """The item ends and its file is moved right after the scan saw the name as known."""

        def __contains__(self, key: object) -> bool:
            known = super().__contains__(key)
            if known and key == "x":
                assert src.dispose(item_of(new, ItemState.DONE)) is not None
            return known

    src.known = MovedWhenAsked({"x"})
    assert src.scan() == []
    assert src.known == set()
    assert (tmp_path / "done" / "x").read_text() == "x"


def test_a_changed_file_is_left_in_place_with_reingest_changed(tmp_path: Path) -> None:
    (tmp_path / "in").mkdir()
    f = tmp_path / "in" / "x"
    f.write_text("x")
    src = source(tmp_path, on_done="delete", reingest_changed=True)
    [new] = src.select(src.scan(), wall=time.time() + 60)
    f.write_text("a new version")
    assert src.dispose(item_of(new, ItemState.DONE)) == Disposed(
        "'x' changed since its item was taken; left in place"
    )
    assert f.exists()


def test_the_disposition_folders_inside_the_source_are_not_scanned(tmp_path: Path) -> None:
    (tmp_path / "in" / "done").mkdir(parents=True)
    (tmp_path / "in" / "done" / "old.txt").write_text("x")
    (tmp_path / "in" / "sub").mkdir()
    (tmp_path / "in" / "sub" / "new.txt").write_text("x")
    src = source(tmp_path, recursive=True, on_done="move:in/done")
    assert [f.rel for f in src.scan()] == ["sub/new.txt"]


def test_free_name() -> None:
    assert free_name("/d/a.tar.gz", 1) == "/d/a.tar.1.gz"
    assert free_name("/d/README", 2) == "/d/README.2"
    assert free_name("/d/.env", 1) == "/d/.env.1"


def test_move_no_clobber_onto_itself_leaves_the_file_as_it_is(tmp_path: Path) -> None:
    # A dead item requeued from its failed folder and dead again: moved where it already is
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / "a.pdf").write_text("a")
    where = move_no_clobber(str(tmp_path / "failed" / "a.pdf"), str(tmp_path / "failed/a.pdf"))
    assert where == str(tmp_path / "failed" / "a.pdf")
    assert os.listdir(tmp_path / "failed") == ["a.pdf"]


def test_move_no_clobber_across_file_systems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_link(*_args: object, **_kw: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    (tmp_path / "a").write_text("payload")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a").write_text("taken")
    assert move_no_clobber(str(tmp_path / "a"), str(tmp_path / "out" / "a")) == str(
        tmp_path / "out" / "a.1"
    )
    assert (tmp_path / "out" / "a.1").read_text() == "payload"
    assert (tmp_path / "out" / "a").read_text() == "taken"
    assert not (tmp_path / "a").exists()

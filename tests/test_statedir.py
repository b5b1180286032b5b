"""The state folder is this user's alone: ``run``, ``batch`` and ``purge`` refuse one that
other users could redirect the service's writes and removals through (exit 3), and warn about
one they can only look into; the reading commands read it as it is.

Found by an acceptance tester (session 16): a state folder of another user's, mode 0777, was
used by root as it was; that user replaced ``work`` by a link, and root, removing a done item's
workdir, removed the files of the folder the link pointed to.

Real folders, modes and links. "Another user" is nobody (uid 65534) when the tests run as root;
otherwise this user's uid is made to look like someone else's.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pwd
from typing import TYPE_CHECKING

import pytest

from orchestrator.cli import EXIT_OK, EXIT_STORE, main
from orchestrator.errors import StoreUnavailable
from orchestrator.instance import LOCK_NAME

if TYPE_CHECKING:
    from pathlib import Path

#: Lists the item's workdir: a done item's workdir is removed, its run has a log.
CONFIG = """\
state_dir = "{state_dir}"
[http]
listen = false
[[sources]]
name = "in"
type = "directory"
path = "inbox"
settle = "0s"
route = ["x"]
[[stages]]
name = "x"
command = ["ls", "-a", "{{workdir}}"]
"""

#: What any refusal says after the folder's name and owner.
PLANTED = "could put links in it that make orchestrator write or remove files elsewhere"


def make_config(tmp_path: Path, state_dir: str = "st") -> Path:
    (tmp_path / "inbox").mkdir()
    (tmp_path / "inbox" / "b.txt").write_text("1")
    config = tmp_path / "orch.toml"
    config.write_text(CONFIG.format(state_dir=state_dir))
    return config


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = main(list(args))
    return code, out.getvalue(), capsys.readouterr().err


def precious(tmp_path: Path) -> Path:
    """Another folder's file, named as an item's workdir would be (``1``)."""
    target = tmp_path / "target"
    (target / "1").mkdir(parents=True)
    (target / "1" / "keep.txt").write_text("precious")
    return target


def give_away(path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """Make ``path`` another user's; that user's name."""
    if os.geteuid() == 0:
        os.chown(path, 65534, 65534)
        return pwd.getpwuid(65534).pw_name if _known(65534) else "uid 65534"
    mine = os.geteuid()
    monkeypatch.setattr(os, "geteuid", lambda: mine + 1)  # the folder stays mine: not theirs
    return pwd.getpwuid(mine).pw_name if _known(mine) else f"uid {mine}"


def _known(uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_batch_refuses_another_users_folder_and_removes_nothing_through_its_link(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given: the tester's folder: another user's, mode 0777, its `work` a link to a folder
    # that has a `1` in it (the first item's workdir)
    config = make_config(tmp_path)
    target = precious(tmp_path)
    st = tmp_path / "st"
    st.mkdir()
    (st / "work").symlink_to(target)
    st.chmod(0o777)
    owner = give_away(st, monkeypatch)

    # When: a batch
    code, _, err = cli(capsys, "batch", "-c", str(config), "--no-progress")

    # Then: exit 3, one line naming the folder, its owner and mode, and what to do; nothing
    # was removed through the link, and nothing written in the folder (not even the lock)
    assert code == EXIT_STORE
    assert f"cannot use the state folder {str(st)!r} (owner {owner}, mode 0777): " in err
    assert PLANTED in err
    assert f"run orchestrator as {owner}, or give it a state_dir of " in err
    assert (target / "1" / "keep.txt").read_text() == "precious"
    assert sorted(os.listdir(st)) == ["work"]


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o733], ids=["0777", "1777", "0733"])
def test_batch_refuses_a_folder_of_ours_every_user_can_write_in(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mode: int
) -> None:
    # Given: our own folder, writable by all (the sticky bit does not stop a new link)
    config = make_config(tmp_path)
    st = tmp_path / "st"
    st.mkdir()
    st.chmod(mode)

    # When: a batch, and check
    code, _, err = cli(capsys, "batch", "-c", str(config), "--no-progress")
    _, out, _ = cli(capsys, "check", "-c", str(config), "--json")

    # Then: refused with what to do; check warns that it would be
    assert code == EXIT_STORE
    assert f"(owner {_me()}, mode {mode:04o}): every user can write in it, and {PLANTED}" in err
    assert err.rstrip().endswith("; chmod 700 it")
    assert not (st / LOCK_NAME).exists()
    [warning] = json.loads(out)["warnings"]
    assert warning.startswith(f"state_dir: cannot use the state folder {str(st)!r}")
    assert warning.endswith("; run, batch and purge refuse it")


@pytest.mark.parametrize(
    ("name", "make", "said"),
    [
        ("work", "link", "'work' in it is a link (to "),
        ("runs", "link", "'runs' in it is a link (to "),
        ("runs", "file", "'runs' in it is not a folder; move it away"),
        ("work", "0777", "'work' in it (owner {me}, mode 0777): every user can write in it"),
    ],
)
def test_batch_refuses_work_or_runs_that_is_a_link_or_open_to_others(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, make: str, said: str
) -> None:
    # Given: our own private folder, `work` or `runs` in it a link to another folder, a
    # file, or a folder every user can write in
    config = make_config(tmp_path)
    target = precious(tmp_path)
    st = tmp_path / "st"
    st.mkdir(mode=0o700)
    inside = st / name
    if make == "link":
        inside.symlink_to(target)
    elif make == "file":
        inside.write_text("")
    else:
        inside.mkdir()
        inside.chmod(0o777)

    # When: a batch
    code, _, err = cli(capsys, "batch", "-c", str(config), "--no-progress")

    # Then: refused, and nothing was written or removed where the link points
    assert code == EXIT_STORE
    assert f"cannot use the state folder {str(st)!r}: {said.format(me=_me())}" in err
    assert sorted(os.listdir(target)) == ["1"]
    assert os.listdir(target / "1") == ["keep.txt"]


@pytest.mark.parametrize("name", ["journal", "journal.new"])
@pytest.mark.parametrize(
    ("make", "said"),
    [
        ("link", "is a link; remove it (orchestrator writes the file itself)"),
        ("folder", "is not a regular file; move it away (orchestrator writes the file itself)"),
        ("fifo", "is not a regular file; move it away (orchestrator writes the file itself)"),
    ],
)
def test_batch_refuses_a_run_journal_that_is_not_a_file_of_its_own(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, make: str, said: str
) -> None:
    # Found by an acceptance tester (session 17): a link or a folder there crashed every start
    # with a traceback (exit 1), and a FIFO hung start-up for good.
    # Given: our own private folder, the run journal's place taken by something else
    config = make_config(tmp_path)
    target = precious(tmp_path)
    st = tmp_path / "st"
    st.mkdir(mode=0o700)
    inside = st / name
    if make == "link":
        inside.symlink_to(target / "1" / "keep.txt")
    elif make == "folder":
        inside.mkdir()
    else:
        os.mkfifo(inside)

    # When: a batch
    code, _, err = cli(capsys, "batch", "-c", str(config), "--no-progress")

    # Then: refused with what to do, nothing read or written through it
    assert code == EXIT_STORE
    assert f"cannot use the state folder {str(st)!r}: {name!r} in it {said}" in err
    assert (target / "1" / "keep.txt").read_text() == "precious"


def test_state_dir_dot_readable_by_others_is_used_as_it_is_with_a_warning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: state_dir = "." -- the config's own folder, mode 0755 (as mkdir makes it)
    config = make_config(tmp_path, state_dir=".")
    tmp_path.chmod(0o755)

    # When: a batch, check, and the reading commands
    code, _, err = cli(capsys, "batch", "-c", str(config), "--no-progress")
    _, plan, _ = cli(capsys, "check", "-c", str(config), "--json")
    items, listed, items_err = cli(capsys, "items", "-c", str(config), "--json")

    # Then: the batch ran, said once that others can look in, and left the mode as it was
    warning = (
        f"other users can look into the state folder {str(tmp_path)!r} (mode 0755): the files "
        "in it are private, their names are not; chmod 700 it"
    )
    assert code == EXIT_OK, err
    assert err.count(warning) == 1
    assert oct(tmp_path.stat().st_mode & 0o7777) == "0o755"
    assert json.loads(plan)["warnings"] == [f"state_dir: {warning}"]
    # the reading commands read it, and say nothing about it
    assert items == EXIT_OK
    assert [i["state"] for i in json.loads(listed)] == ["done"]
    assert items_err == ""


def test_reading_commands_read_a_refused_folder_and_purge_refuses_to_remove_in_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given: a batch's state, whose folder is opened to every user afterwards
    config = make_config(tmp_path)
    assert cli(capsys, "batch", "-c", str(config), "--no-progress")[0] == EXIT_OK
    st = tmp_path / "st"
    logs = sorted(os.listdir(st / "runs"))
    st.chmod(0o777)

    # When: the reading commands, a dry-run purge and a purge
    results = {
        args[0]: cli(capsys, *args, "-c", str(config), "--json")
        for args in (("items",), ("show", "in:b.txt"), ("status",))
    }
    dry, _, _ = cli(capsys, "purge", "--older-than", "0s", "--dry-run", "-c", str(config))
    code, _, err = cli(capsys, "purge", "--older-than", "0s", "-c", str(config))

    # Then: they read it; the purge (which removes run logs and workdirs) refuses, exit 3
    assert {name: r[0] for name, r in results.items()} == dict.fromkeys(results, EXIT_OK)
    assert dry == EXIT_OK
    assert code == EXIT_STORE
    assert f"cannot use the state folder {str(st)!r} (owner {_me()}, mode 0777)" in err
    assert sorted(os.listdir(st / "runs")) == logs


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another group needs root")
def test_a_group_may_write_in_the_folder_only_when_it_is_our_private_group(
    tmp_path: Path,
) -> None:
    # Given: a folder mode 0770, of root's group (root's own: no other member), then nogroup's
    from orchestrator.instance import check_state_dir

    st = tmp_path / "st"
    st.mkdir()
    st.chmod(0o770)
    os.chown(st, 0, 0)

    # Then: our private group may write (as Debian's OpenSSH allows); another group may not
    assert check_state_dir(st) == []
    os.chown(st, 0, 65534)
    with pytest.raises(StoreUnavailable, match=r"\(owner root, mode 0770\): the group "):
        check_state_dir(st)


def test_removing_or_making_a_workdir_and_writing_a_run_log_never_follow_a_link(
    tmp_path: Path,
) -> None:
    # Given: another folder's files, and links to them where a workdir and a run log go
    from orchestrator.runner import _Output
    from orchestrator.workers import _make_workdir, _remove_trees

    target = precious(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    (work / "1").symlink_to(target / "1")
    (work / "2").symlink_to(target / "1")
    (tmp_path / "3.log").symlink_to(target / "1" / "keep.txt")

    # When: a done item's workdir is removed, a retry's made, a run's log written
    _remove_trees([str(work / "1")])
    with pytest.raises(NotADirectoryError):
        _make_workdir(str(work / "2"), '{"id": 2}')
    output = _Output(-1, str(tmp_path / "3.log"), 1024)
    output._write(b"run output\n")

    # Then: the link went, not what it points to; no payload and no log went through one
    assert not os.path.lexists(work / "1")
    assert sorted(os.listdir(target / "1")) == ["keep.txt"]
    assert (target / "1" / "keep.txt").read_text() == "precious"
    assert output.log_error is not None


def _me() -> str:
    return pwd.getpwuid(os.geteuid()).pw_name

"""The misbehaving stage program and the [faults] wrapper, run for real."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import TYPE_CHECKING

import pytest
from conftest import open_db

from orchestrator.fakestage import parse_faults
from orchestrator.supervisor import serve

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from orchestrator.config import Config

FAKE = [sys.executable, "-m", "orchestrator.fakestage"]


def test_parse_faults_checks_names_and_rates() -> None:
    assert parse_faults("fail=0.1, hang=0.02") == {"fail": 0.1, "hang": 0.02}
    assert parse_faults("") == {}
    with pytest.raises(ValueError, match="unknown fault 'explode'"):
        parse_faults("explode=0.1")
    with pytest.raises(ValueError, match="more than 1"):
        parse_faults("fail=0.7,hang=0.7")
    with pytest.raises(ValueError, match="between 0 and 1"):
        parse_faults("fail=2")


@pytest.mark.parametrize(
    ("mode", "status"), [("ok", 0), ("fail", 3), ("signal", -11), ("garbage", 0), ("flood", 0)]
)
def test_modes_end_as_documented(tmp_path: Path, mode: str, status: int) -> None:
    audit = tmp_path / "audit.jsonl"
    proc = subprocess.run([*FAKE, "--mode", mode, "--duration", "0.01", "--audit", str(audit)],
                          capture_output=True, timeout=30, check=False)  # fmt: skip
    assert proc.returncode == status
    events = [json.loads(line)["event"] for line in audit.read_text().splitlines()]
    assert events == (["start"] if status < 0 else ["start", "end"])
    if mode == "flood":
        assert len(proc.stdout) > 2_000_000


def test_an_overlap_is_recorded_by_the_os(tmp_path: Path) -> None:
    # Given: one run holding the only slot of a limit of 1.
    audit = tmp_path / "audit.jsonl"
    args = ["--lock-dir", str(tmp_path / "locks"), "--limit", "1", "--audit", str(audit)]
    first = subprocess.Popen([*FAKE, "--mode", "ok", "--duration", "2", *args])
    try:
        deadline = time.monotonic() + 20
        while not (audit.exists() and "start" in audit.read_text()):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        # When: a second run starts while the first holds its slot.
        subprocess.run([*FAKE, "--mode", "ok", "--duration", "0", *args], timeout=30, check=True)
    finally:
        first.kill()
        first.wait()
    # Then: the second one recorded the overlap.
    events = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [e["event"] for e in events].count("overlap") == 1


async def test_faults_section_wraps_real_stages(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    # Given: a real stage wrapped by [faults] with every run failing.
    (tmp_path / "in").mkdir()
    for i in range(3):
        (tmp_path / "in" / f"f{i}").write_text("x")
    config = write_config("""
        [http]
        listen = false
        [faults]
        enabled = true
        fail_rate = 1.0
        stages = ["real"]
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["real", "other"]
        settle = "0s"
        [[stages]]
        name = "real"
        command = ["true"]
        [[stages]]
        name = "other"
        command = ["true"]
        """)
    result = await serve(config, batch=True)
    assert result.tally.dead == 3
    with open_db(config.state_dir / "orchestrator.db") as db:
        tails = {r[0] for r in db.execute("SELECT tail FROM runs")}
    assert tails == {"fakestage: injected failure (faults.fail_rate)"}


async def test_faults_delay_then_runs_the_real_command(
    tmp_path: Path, write_config: Callable[[str], Config]
) -> None:
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "f").write_text("x")
    out = tmp_path / "out"
    config = write_config(f"""
        [http]
        listen = false
        [faults]
        enabled = true
        delay_rate = 1.0
        delay = "300ms"
        [[sources]]
        name = "in"
        type = "directory"
        path = "in"
        route = ["real"]
        settle = "0s"
        [[stages]]
        name = "real"
        command = ["cp", "{{path}}", "{out}"]
        """)
    result = await serve(config, batch=True)
    assert result.tally.done == 1
    assert out.read_text() == "x"
    with open_db(config.state_dir / "orchestrator.db") as db:
        [duration] = [r[0] for r in db.execute("SELECT duration FROM runs")]
    assert duration >= 0.3

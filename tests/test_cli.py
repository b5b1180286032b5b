from __future__ import annotations

import json
import textwrap
from typing import TYPE_CHECKING

from orchestrator.cli import EXIT_CONFIG, EXIT_OK, main

if TYPE_CHECKING:
    from pathlib import Path

    import pytest

BAD = """
    state_dir = 5
    [http]
    listen = true
    [pools]
    gpu = 0
    [[sources]]
    name = "in"
    type = "ftp"
    path = "inbox"
    route = ["extract", "ocr"]
    [[stages]]
    name = "extract"
    command = "extract {path}"
    concurency = 2
    timeout = "soon"
    pools = ["tpu"]
"""


def test_check_reports_every_error_with_its_path_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(textwrap.dedent(BAD))
    assert main(["check", "-c", str(config)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    for expected in (
        "state_dir:",
        "http.listen:",
        "pools.gpu: must be >= 1, got 0",
        'sources[0].type: expected one of directory, jsonl, json, got "ftp"',
        'sources[0].route[1]: unknown stage "ocr" (stages: extract)',
        "stages[0].command: expected an array",
        'stages[0].concurency: unknown key (did you mean "concurrency"?)',
        'stages[0].timeout: expected a duration like "30s", got "soon"',
        'stages[0].pools[0]: unknown pool "tpu" (pools: gpu)',
    ):
        assert expected in err, (expected, err)


def test_every_command_refuses_a_missing_config(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    for command in ("check", "run", "batch"):
        assert main([command, "-c", str(tmp_path / "nope.toml")]) == EXIT_CONFIG
    assert "cannot read config" in capsys.readouterr().err


def test_check_json_plan(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "ok.toml"
    config.write_text(textwrap.dedent("""
        [pools]
        gpu = 1
        [[sources]]
        name = "in"
        type = "directory"
        path = "inbox"
        route = ["extract"]
        [[stages]]
        name = "extract"
        command = ["extract", "{path}"]
        pools = ["gpu"]
        timeout = "30m"
        """))
    assert main(["check", "-c", str(config), "--json"]) == EXIT_OK
    plan = json.loads(capsys.readouterr().out)
    assert plan["sources"][0]["route"] == ["extract"]
    assert plan["stages"][0]["timeout"] == 1800
    assert plan["pools"] == {"gpu": {"size": 1, "stages": ["extract"]}}
    assert plan["http"] == "127.0.0.1:8787"

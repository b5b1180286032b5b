"""The json (array) source without a store: new elements by id, rewrites, unparsable content."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING, Any

from orchestrator.config import parse_config
from orchestrator.sources import JsonArraySource
from orchestrator.sources.jsonarray import new_elements
from orchestrator.store.records import ItemState

if TYPE_CHECKING:
    from pathlib import Path

    import pytest


def source(tmp_path: Path) -> JsonArraySource:
    data = {
        "sources": [{"name": "ideas", "type": "json", "path": "ideas.json", "route": ["s"],
                     "id_field": "id"}],
        "stages": [{"name": "s", "command": ["true"]}],
    }  # fmt: skip
    return JsonArraySource(parse_config(data, base_dir=tmp_path).sources[0], set())


def write_old(path: Path, document: object) -> None:
    """Write as the writer would, with an mtime in the past (not 'just modified')."""
    path.write_text(json.dumps(document))
    past = time.time() - 60
    os.utime(path, (past, past))


def test_new_elements_by_id_and_rejections_once(tmp_path: Path) -> None:
    config = source(tmp_path).config
    elements: list[object] = [
        {"id": "a", "text": "first"}, {"text": "no id"}, "just a string", {"id": "a", "x": 2},
        {"id": 5},
    ]  # fmt: skip
    items = new_elements(config, elements, known={"5"})
    assert [(i.key, i.state.value) for i in items] == [
        ("a", "queued"), (items[1].key, "rejected"), (items[2].key, "rejected"),
    ]  # fmt: skip
    assert items[0].id == "ideas:a"
    assert json.loads(items[0].payload or "") == {"id": "a", "text": "first"}
    assert items[1].reason == 'element 1: no \'id\' field; element: {"text": "no id"}'
    assert items[2].reason == 'element 2: not a JSON object but a string; element: "just a string"'
    # A rejected element is keyed by its content: the same one again is not rejected again.
    again = new_elements(config, elements, known={i.key for i in items} | {"5"})
    assert again == []


def test_an_element_with_a_lone_surrogate_keeps_it_escaped_in_its_payload(tmp_path: Path) -> None:
    # Found in session 6: the payload held the surrogate itself, which the store cannot hold,
    # so a valid element was rejected (and the reason blamed its id).
    config = source(tmp_path).config
    element = {"id": "s", "v": "\ud800", "w": "café"}
    [item] = new_elements(config, [element], known=set())
    assert item.state.value == "queued"
    assert item.payload is not None
    item.payload.encode()  # valid UTF-8 text
    assert json.loads(item.payload) == element
    [plain] = new_elements(config, [{"id": "t", "w": "café"}], known=set())
    assert plain.payload == '{"id": "t", "w": "café"}'  # UTF-8 stays readable when it can


def test_a_rewrite_with_one_new_element_adds_exactly_one(tmp_path: Path) -> None:
    path = tmp_path / "ideas.json"
    src = source(tmp_path)
    assert src.read().outcome == "missing"
    write_old(path, [{"id": 1}, {"id": 2}])
    found = src.read()
    assert [i.key for i in found.items] == ["1", "2"]
    src.known.update(i.key for i in found.items)
    # Rewritten atomically (a new inode) with one more element.
    tmp = tmp_path / "ideas.json.tmp"
    write_old(tmp, [{"id": 1}, {"id": 2}, {"id": 3, "idea": "new"}])
    os.replace(tmp, path)
    [new] = src.read().items
    assert (new.key, new.payload) == ("3", '{"id": 3, "idea": "new"}')


def test_an_unchanged_file_is_not_parsed_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "ideas.json"
    write_old(path, [{"id": 1}])
    src = source(tmp_path)
    assert src.read().outcome == "parsed"
    parses: list[bytes] = []
    real_loads = json.loads

    def counting_loads(data: bytes, **hooks: Any) -> object:
        parses.append(data)
        return real_loads(data, **hooks)

    monkeypatch.setattr(json, "loads", counting_loads)
    assert src.read().outcome == "unchanged"
    assert parses == []
    # Rewritten in place (same inode), same size, new mtime: parsed again.
    path.write_text(json.dumps([{"id": 2}]))
    assert src.read().outcome == "parsed"
    assert len(parses) == 1


def test_unparsable_content_is_retried_and_counted(tmp_path: Path) -> None:
    path = tmp_path / "ideas.json"
    path.write_text('[{"id": 1}, {"id"')  # the writer is mid-rewrite
    src = source(tmp_path)
    found = src.read()
    assert found.outcome == "failed"
    assert found.error is not None
    assert found.error.startswith("not valid JSON: ")
    path.write_text('{"id": 1}')
    assert src.read().error == "not a JSON array but an object"
    write_old(path, [{"id": 1}])
    assert [i.key for i in src.read().items] == ["1"]


def test_rejected_items_carry_state_and_reason(tmp_path: Path) -> None:
    path = tmp_path / "ideas.json"
    write_old(path, [[1, 2]])
    [item] = source(tmp_path).read().items
    assert item.state is ItemState.REJECTED
    assert item.payload is None
    assert item.reason == "element 0: not a JSON object but an array; element: [1, 2]"


def test_an_element_holding_nan_or_infinity_is_rejected_alone(tmp_path: Path) -> None:
    # Found in session 6: its payload went to the stage as NaN, which strict parsers refuse.
    path = tmp_path / "ideas.json"
    # The reason names the number as the file wrote it, in the jsonl source's words (issue 2).
    path.write_text('[{"id": "a", "v": NaN}, {"id": "b", "v": [1, -Infinity]}, {"id": "c", "v": 1e999},'
                    ' {"id": "d", "v": 1.5}, {"id": "e", "v": {"w": -1E+400}}, {"id": "f", "v": 1e-999}]')  # fmt: skip
    past = time.time() - 60
    os.utime(path, (past, past))
    items = source(tmp_path).read().items
    states = [(i.state.value, (i.reason or "").split(";")[0]) for i in items]
    assert states == [
        ("rejected", "element 0: not valid JSON (NaN is not a JSON number)"),
        ("rejected", "element 1: not valid JSON (-Infinity is not a JSON number)"),
        ("rejected", "element 2: number 1e999 is out of range (it reads as infinity, which JSON has no number for)"),
        ("queued", ""),
        ("rejected", "element 4: number -1E+400 is out of range (it reads as -infinity, which JSON has no number for)"),
        ("queued", ""),
    ]  # fmt: skip
    assert json.loads(items[3].payload or "") == {"id": "d", "v": 1.5}
    assert json.loads(items[5].payload or "") == {"id": "f", "v": 0.0}  # (too small is 0)
    # Elements not read from a file (no text to show) are named as JSON writes them.
    [item] = new_elements(source(tmp_path).config, [{"id": "g", "v": float("inf")}], set())
    assert (item.reason or "").startswith("element 0: not valid JSON (Infinity is not")

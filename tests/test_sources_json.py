"""The json (array) source without a store: new elements by id, rewrites, unparsable content."""

from __future__ import annotations

import json
import os
import time
from typing import TYPE_CHECKING

import pytest

from orchestrator.config import parse_config
from orchestrator.sources import JsonArraySource, jsonarray
from orchestrator.sources.jsonarray import Element, new_elements, split_array
from orchestrator.store.records import ItemState

if TYPE_CHECKING:
    from pathlib import Path


def source(tmp_path: Path) -> JsonArraySource:
    data = {
        "sources": [{"name": "ideas", "type": "json", "path": "ideas.json", "route": ["s"],
                     "id_field": "id"}],
        "stages": [{"name": "s", "command": ["true"]}],
    }  # fmt: skip
    return JsonArraySource(parse_config(data, base_dir=tmp_path).sources[0], set())


def write_old(path: Path, document: object) -> None:
    """Write as the writer would, with an mtime in the past (not 'just modified')."""
    write_old_bytes(path, json.dumps(document).encode())


def write_old_bytes(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    past = time.time() - 60
    os.utime(path, (past, past))


def elements_of(values: list[object]) -> list[Element]:
    return split_array(json.dumps(values))


def test_new_elements_by_id_and_rejections_once(tmp_path: Path) -> None:
    config = source(tmp_path).config
    elements = elements_of([
        {"id": "a", "text": "first"}, {"text": "no id"}, "just a string", {"id": "a", "x": 2},
        {"id": 5},
    ])  # fmt: skip
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
    # so a valid element was rejected (and the reason blamed its id). Python's JSON reads one
    # from the file's bytes (b"\xed\xa0\x80") as well as from its escape.
    path = tmp_path / "ideas.json"
    write_old_bytes(path, b'[{"id": "s", "v": "\xed\xa0\x80", "w": "caf\xc3\xa9"},'
                          b' {"id": "e", "v": "\\ud800"}, {"id": "t", "w": "caf\xc3\xa9"}]')  # fmt: skip
    items = source(tmp_path).read().items
    assert [i.state.value for i in items] == ["queued", "queued", "queued"]
    payloads = [i.payload or "" for i in items]
    assert payloads[0] == '{"id": "s", "v": "\\ud800", "w": "café"}'  # valid UTF-8 text
    assert json.loads(payloads[0]) == {"id": "s", "v": "\ud800", "w": "café"}
    assert payloads[1] == '{"id": "e", "v": "\\ud800"}'
    assert payloads[2] == '{"id": "t", "w": "café"}'  # UTF-8 stays readable when it can


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
    parses: list[str] = []
    real_split = split_array

    def counting_split(text: str, *, undecodable: bool = False) -> list[Element]:
        parses.append(text)
        return real_split(text, undecodable=undecodable)

    monkeypatch.setattr(jsonarray, "split_array", counting_split)
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
    assert items[3].payload == '{"id": "d", "v": 1.5}'
    assert items[5].payload == '{"id": "f", "v": 1e-999}'  # (too small is 0: JSON has no limit)
    # The reason shows the element as the file wrote it.
    assert (items[2].reason or "").endswith('; element: {"id": "c", "v": 1e999}')


def test_an_element_reaches_its_stage_exactly_as_the_file_wrote_it(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): each element was parsed and written again, so
    # 12345678901234567.89 reached the stage as 1.2345678901234568e+16, 9007199254740993.0 as
    # 9007199254740992.0 and 1e5 as 100000.0 (the jsonl source passes its lines byte for byte).
    # Given: a compact element, and a pretty-printed one, in a file with a byte-order mark and
    # CRLF line ends.
    compact = (
        '{"id":"o1","amount":12345678901234567.89,"exact":9007199254740993.0,"e":1e5,"p":1.10}'
    )
    pretty = '{\r\n    "b": "caf\\u00e9 \\"q\\"",\r\n    "id": 2,\r\n    "a": [1E+2, -0.0]\r\n  }'
    path = tmp_path / "ideas.json"
    write_old_bytes(path, f"\ufeff[\r\n  {compact},\r\n  {pretty}\r\n]\r\n".encode())
    # When: the source reads it.
    items = source(tmp_path).read().items
    # Then: each payload is the element's own text, numbers, spacing and key order included.
    assert [(i.key, i.state.value) for i in items] == [("o1", "queued"), ("2", "queued")]
    assert items[0].payload == compact
    assert items[1].payload == pretty


def test_an_element_with_an_integer_too_long_for_python_is_rejected_alone(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): an integer of more than 4,300 digits (valid
    # JSON, but more than Python converts) failed the whole file: no element of it was taken,
    # and a service never took anything from it again.
    # Given: such an integer in the second of three elements (and a negative one in the fourth).
    path = tmp_path / "ideas.json"
    big = "9" * 5000
    text = f'[{{"id": "good1"}}, {{"id": "big", "n": [1, {big}]}}, {{"id": "good2"}}, {{"id": -{big}}}]'
    write_old_bytes(path, text.encode())
    src = source(tmp_path)
    # When: the source reads it.
    found = src.read()
    # Then: the others are taken, and it is rejected alone, its index and the digits said.
    assert found.outcome == "parsed"
    states = [(i.key, i.state.value) for i in found.items]
    assert states == [
        ("good1", "queued"), (found.items[1].key, "rejected"), ("good2", "queued"),
        (found.items[3].key, "rejected"),
    ]  # fmt: skip
    reason = found.items[1].reason or ""
    assert reason.startswith(
        "element 1: number 99999999999999999999... has 5000 digits, more than the 4300 Python"
        ' reads in an integer (a stage in Python could not parse its payload); element: {"id":'
    )
    assert (found.items[3].reason or "").startswith("element 3: number -9999")
    # Rejected once: the next read of the same elements finds nothing new.
    src.known = found.keys
    write_old_bytes(path, text.encode() + b"\n")
    assert src.read().items == []


def test_an_element_nested_too_deep_for_python_is_rejected_alone(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): one element nested deeper than Python's JSON
    # reader goes (a RecursionError) failed the whole file, and a service never took anything
    # from it again.
    # Given: such an element between two good ones, a bracket inside a string after it.
    path = tmp_path / "ideas.json"
    deep = "[" * 5000 + "]" * 5000
    text = f'[{{"id": "good1"}}, {{"id": "deep", "x": {deep}}}, {{"id": "good2", "s": "]\\"["}}]'
    write_old_bytes(path, text.encode())
    src = source(tmp_path)
    # When: the source reads it.
    found = src.read()
    # Then: the others are taken; it is rejected alone, its depth said.
    assert found.outcome == "parsed"
    states = [(i.key, i.state.value) for i in found.items]
    assert states == [("good1", "queued"), (found.items[1].key, "rejected"), ("good2", "queued")]
    assert (found.items[1].reason or "").startswith(
        "element 1: nested 5001 levels deep, deeper than Python's JSON reader goes"
    )
    assert found.items[2].payload == '{"id": "good2", "s": "]\\"["}'
    # Rejected once, keyed by its text: the next read of the same elements finds nothing new.
    src.known = found.keys
    write_old_bytes(path, text.encode() + b"\n")
    assert src.read().items == []


def test_a_deep_element_cut_short_is_still_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "ideas.json"
    write_old_bytes(path, b'[{"id": "good1"}, {"id": "deep", "x": ' + b"[" * 5000)
    found = source(tmp_path).read()
    assert found.outcome == "failed"
    assert (found.error or "").startswith("not valid JSON: Unterminated nested element")


def test_an_element_holding_bytes_that_are_not_utf8_is_rejected_alone(tmp_path: Path) -> None:
    # Found by an acceptance tester (session 16): one Latin-1 byte anywhere in the file failed
    # it as a whole ("not valid JSON"), so none of its elements was ever taken.
    # Given: a Latin-1 "é" in one element's string, valid UTF-8 and a byte-order mark elsewhere.
    path = tmp_path / "ideas.json"
    write_old_bytes(path, b'\xef\xbb\xbf[{"id": "good1", "w": "caf\xc3\xa9"},'
                          b' {"id": "latin", "w": "caf\xe9"}, {"id": "good2"}]')  # fmt: skip
    src = source(tmp_path)
    # When: the source reads it.
    found = src.read()
    # Then: the others are taken as written; it is rejected alone, the byte and its place said.
    assert found.outcome == "parsed"
    states = [(i.key, i.state.value) for i in found.items]
    assert states == [("good1", "queued"), (found.items[1].key, "rejected"), ("good2", "queued")]
    assert found.items[0].payload == '{"id": "good1", "w": "café"}'
    assert (found.items[1].reason or "").startswith(
        "element 1: holds bytes that are not UTF-8 (0xe9 at byte 25 of the element); element:"
    )
    # Rejected once: the next read of the same elements finds nothing new.
    src.known = found.keys
    write_old_bytes(path, path.read_bytes() + b"\n")
    assert src.read().items == []


def test_a_file_cut_short_after_a_long_integer_is_still_mid_write(tmp_path: Path) -> None:
    path = tmp_path / "ideas.json"
    write_old_bytes(path, b'[{"id": "good1"}, {"id": "big", "n": ' + b"9" * 5000 + b", ")
    found = source(tmp_path).read()
    assert found.outcome == "failed"
    assert (found.error or "").startswith(
        "not valid JSON: Expecting property name enclosed in double quotes: line 1 column 5040"
    )


def test_split_array_reads_and_refuses_what_json_loads_does() -> None:
    good = ["[]", " [ ] ", '[{"a": 1} , 2,"x" ,null]', "\n[\t[1, [2]],\r\n{}]\n"]
    for text in good:
        assert [e.value for e in split_array(text)] == json.loads(text)
    bad = ["", "[", "[1", "[1,]", "[1 2]", "[1] x", "[] []", "[,1]", '[{"a" 1}]', "]", "x"]
    for text in bad:
        with pytest.raises(json.JSONDecodeError) as refused:
            json.loads(text)
        with pytest.raises(json.JSONDecodeError) as split:
            split_array(text)
        assert str(split.value) == str(refused.value)

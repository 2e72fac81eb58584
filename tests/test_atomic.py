"""The shared atomic writer: a failed write leaves the old file and no temporary behind."""

import json

import pytest

from mergeflow import atomic


def test_write_jsonl_round_trips_unicode_and_replaces(tmp_path):
    path = tmp_path / "sub" / "rows.jsonl"
    atomic.write_jsonl(path, [{"a": "é"}, {"b": 2}], fsync=True)
    assert path.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": 2}\n'
    atomic.write_jsonl(path, [{"c": 3}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"c": 3}]


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "rows.jsonl"
    atomic.write_text(path, "old\n")

    def rows():
        yield {"ok": 1}
        raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError):
        atomic.write_jsonl(path, rows())
    assert path.read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rows.jsonl"]

"""aimv2data/atomic.py, the one way files are written: all or nothing, temp files no glob can pick up."""
import json

import pytest

from aimv2data.atomic import atomic_write, read_jsonl, tmp_name, write_json_atomic, write_text_atomic
from aimv2data.manifest import layout


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path):
    path = tmp_path / "d" / "x.json"
    write_json_atomic({"a": 1}, path)
    assert json.loads(path.read_text()) == {"a": 1} and path.read_text().endswith("\n")

    def half(tmp):
        with open(tmp, "w") as f:
            f.write('{"a": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, half)
    assert json.loads(path.read_text()) == {"a": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.json"]


def test_temp_names_match_no_data_glob(tmp_path):
    """A write in progress (or left by a killed writer) is hidden and ends in .tmp: the manifest's
    samples/*.parquet glob never reads it, and cleaners find it by `.*.tmp`."""
    part = tmp_path / layout.SAMPLES / "part-0.parquet"
    part.parent.mkdir()
    t = tmp_name(part)
    assert t.parent == part.parent and t.name.startswith(".") and t.name.endswith(".tmp")
    t.write_bytes(b"half")
    assert layout.sample_files(tmp_path) == [] and list(part.parent.glob(".*.tmp")) == [t]


def test_read_jsonl_skips_blank_lines(tmp_path):
    write_text_atomic(tmp_path / "m.jsonl", '{"step": 1}\n\n{"step": 2}\n')
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1}, {"step": 2}]

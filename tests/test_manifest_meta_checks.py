"""Issue 20 point 15: a _manifest.json of an unknown major version, or damaged, and a deleted or
truncated part, are one line naming the file for every reader (loader, stats, caption attach, tokenizer train,
split) and for a shard run that would replace it."""
import json
import os
import sys

import pytest
from click.testing import CliRunner

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402

from aimv2data.loader.samples import Manifest, ManifestError  # noqa: E402
from aimv2data.manifest.build import build_manifest  # noqa: E402
from aimv2data.manifest.captions import CaptionError, attach  # noqa: E402
from cli.main import main  # noqa: E402


@pytest.fixture()
def manifest(tmp_path):
    F.good_tar(tmp_path / "00000.tar", 4, seed=1)
    out = tmp_path / "m"
    build_manifest([str(tmp_path / "00000.tar")], out, progress=False, idx="none")
    return out


def _edit(m, **kv):
    p = m / "_manifest.json"
    meta = json.loads(p.read_text())
    meta.update(kv)
    p.write_text(json.dumps(meta))


# damage -> (the keys written over _manifest.json, or None: cut mid-object), the phrase its refusal holds
DAMAGES = {"json": (None, "is not valid JSON"),
           "patch_size": ({"patch_size": "fourteen"}, "patch_size must be a positive integer, got 'fourteen'"),
           "banana": ({"schema_version": "banana"}, "schema_version 'banana' is not one this aimv2 reads")}


def _damage(m, kind: str) -> str:
    keys, needle = DAMAGES[kind]
    if keys is None:
        (m / "_manifest.json").write_text('{"schema_version": "1.0", ')
    else:
        _edit(m, **keys)
    return needle


def _stats_line(m):
    r = CliRunner().invoke(main, ["stats", str(m)])
    assert r.exit_code == 1 and (r.exception is None or isinstance(r.exception, SystemExit)), r.output
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.output, r.output
    return lines[0]


@pytest.mark.parametrize("version", ["2.0", "banana", 2, True])
def test_an_unknown_major_schema_version_is_refused(manifest, version):
    _edit(manifest, schema_version=version)
    with pytest.raises(ManifestError, match="schema_version .* is not one this aimv2 reads"):
        Manifest(manifest)
    assert "_manifest.json" in _stats_line(manifest)
    with pytest.raises(CaptionError, match="schema_version"):
        attach(manifest, manifest / "x.parquet", on="uid", column="c", name="x")


def test_a_known_major_with_a_newer_minor_is_read(manifest):
    _edit(manifest, schema_version="1.7", future_key={"a": 1})
    assert Manifest(manifest).n == 4


@pytest.mark.parametrize("damage", ["json", "patch_size"])
def test_a_bad_manifest_json_is_one_line_naming_it(manifest, damage):
    needle = _damage(manifest, damage)
    with pytest.raises(ManifestError, match="_manifest.json") as e:
        Manifest(manifest)
    assert needle in str(e.value)
    line = _stats_line(manifest)
    assert needle in line and str(manifest / "_manifest.json") in line


@pytest.mark.parametrize("damage", ["deleted", "truncated"])
def test_stats_on_a_deleted_or_truncated_part_is_one_line(manifest, damage):
    part = next((manifest / "samples").glob("*.parquet"))
    if damage == "deleted":
        part.unlink()
    else:
        part.write_bytes(part.read_bytes()[:100])
    line = _stats_line(manifest)
    assert part.name in line


def _refused(args, *needles):
    r = CliRunner().invoke(main, args)
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 1 and "Traceback" not in r.output and len(lines) == 1, r.output
    assert all(n in lines[0] for n in needles), r.output
    return lines[0]


@pytest.mark.parametrize("damage", ["banana", "json"])
def test_tokenizer_split_and_a_shard_rerun_refuse_a_bad_manifest_json(manifest, tmp_path, damage):
    needle = _damage(manifest, damage)
    where = str(manifest / "_manifest.json")
    _refused(["tokenizer", "train", str(manifest), "-o", str(tmp_path / "tok.model"), "--vocab-size", "40"],
             needle, where)
    assert not (tmp_path / "tok.model").exists()
    _refused(["split", str(manifest), "-o", str(tmp_path / "split")], needle, where)
    assert not (tmp_path / "split").exists()
    before = (manifest / "_manifest.json").read_bytes()
    _refused(["shard", "--merge-only", "-o", str(manifest)], "refusing to replace it", needle, where)
    _refused(["shard", str(tmp_path / "00000.tar"), "-o", str(manifest)], "refusing to replace it", needle)
    assert (manifest / "_manifest.json").read_bytes() == before   # left for the user to move away

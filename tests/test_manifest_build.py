"""`aimv2 shard` end to end on hostile tars: what a reader with only duckdb sees, what DALI can decode,
resume, --part i/N + merge, a killed run, and the .idx files."""
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from aimv2data.manifest.build import ManifestBuildError, build_manifest, merge_manifest, resolve_inputs
from aimv2data.manifest.schema import REJECT_SCHEMA, SAMPLE_SCHEMA

sys.path.insert(0, os.path.dirname(__file__))
import _shard_fixtures as F  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def make_corpus(root: Path) -> dict:
    """shards/00000.tar hostile catalogue, 00001.tar 20 good JPEGs, 00002.tar a truncated copy of 15 good
    ones, 00003.tar zero bytes, 00004.tar an HTML error page. Returns url -> Case (case.meta["key"] is its key)."""
    shards = root / "shards"
    shards.mkdir(parents=True)
    cases = {}
    for keys in (F.write_img2dataset_tar(shards / "00000.tar", F.catalogue()),
                 F.good_tar(shards / "00001.tar", 20, start=1000, seed=1)):
        cases.update({c.meta["url"]: c for c in keys.values()})
        for k, c in keys.items():
            c.meta["key"] = k
    full = root / "full.tar"
    keys = F.good_tar(full, 15, start=2000, seed=2)
    data = full.read_bytes()
    cut_at = data.index(F.jpeg(*list(keys.values())[11].size, 2 * 1000 + 11)) + 300   # inside sample 11's image
    (shards / "00002.tar").write_bytes(data[:cut_at])
    for i, (k, c) in enumerate(keys.items()):
        c.meta["key"] = k
        c.expect = "keep" if i < 11 else ("tar_truncated" if i == 11 else "absent")
        cases[c.meta["url"]] = c
    (shards / "00003.tar").write_bytes(b"")
    (shards / "00004.tar").write_bytes(b"<html><body>502 Bad Gateway</body></html>\n" * 30)
    return cases


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard")
    cases = make_corpus(root)
    report = build_manifest([str(root / "shards")], root / "manifest", progress=False)
    return root, cases, report


# --- what a plain parquet reader sees -------------------------------------------------------------

DUCKDB_ONLY = textwrap.dedent(r"""
    import io, json, os, sys
    import duckdb
    from PIL import Image, ImageOps
    m = sys.argv[1]
    con = duckdb.connect()
    meta = json.load(open(os.path.join(m, "_manifest.json")))
    samples = con.execute('SELECT url, key, shard, "offset", size, width, height, format, orientation, bucket, '
                          'caption FROM read_parquet(?)', [m + "/samples/*.parquet"]).fetchall()
    rejects = con.execute("SELECT url, key, shard, reason FROM read_parquet(?)", [m + "/rejects/*.parquet"]).fetchall()
    decoded = {}
    for url, key, shard, off, size, w, h, fmt, o, b, cap in samples:
        with open(os.path.join(m, shard), "rb") as f:
            f.seek(off)
            im = ImageOps.exif_transpose(Image.open(io.BytesIO(f.read(size))))
            im.load()
        decoded[url] = [im.width, im.height]
    print(json.dumps({"samples": [list(r) for r in samples], "rejects": [list(r) for r in rejects],
                      "decoded": decoded, "buckets": meta["buckets"], "counts": meta["counts"],
                      "ours_imported": any(k.startswith("aimv2") for k in sys.modules)}))
""")


def test_duckdb_alone_reads_sizes_offsets_and_rejects(built):
    root, cases, _ = built
    out = subprocess.run([sys.executable, "-c", DUCKDB_ONLY, str(root / "manifest")], capture_output=True,
                         text=True, timeout=120, cwd=root)
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout)
    assert not r["ours_imported"]
    samples = {s[0]: s for s in r["samples"]}
    rejects = {s[0]: s[3] for s in r["rejects"] if s[0]}
    rejects_by_key = {s[1]: s[3] for s in r["rejects"] if s[1]}
    for url, case in cases.items():
        if case.expect == "keep":
            assert url in samples, case.name
            w, h = samples[url][5:7]
            assert (w, h) == case.size, case.name                 # display size, EXIF applied
            assert r["decoded"][url] == [w, h], case.name         # the bytes at offset decode to it
            edges = [b["hi"] for b in r["buckets"][:-1]]
            assert samples[url][9] == int(np.searchsorted(edges, w / h, side="right"))
        elif case.expect == "absent":                              # cut off with the tar's end
            assert url not in samples and case.meta["key"] not in rejects_by_key
        elif case.expect == "tar_truncated":                       # its json was cut off: known by key
            assert rejects_by_key[case.meta["key"]] == "tar_truncated"
        else:
            assert rejects.get(url) == case.expect, case.name
    tar_level = sorted((s[2], s[3]) for s in r["rejects"] if s[1] is None)
    assert tar_level == [("../shards/00003.tar", "tar_unreadable"), ("../shards/00004.tar", "tar_unreadable")]
    assert r["counts"]["samples"] == len(samples) and r["counts"]["rejects"] == len(r["rejects"])


def test_parts_have_the_specified_schema(built):
    root, _, _ = built
    for f in (root / "manifest/samples").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata() == SAMPLE_SCHEMA
    for f in (root / "manifest/rejects").glob("*.parquet"):
        assert pq.read_schema(f).remove_metadata() == REJECT_SCHEMA


def test_captions_non_utf8_empty_and_from_json(built):
    root, _, _ = built
    import polars as pl

    s = pl.read_parquet(root / "manifest/samples/*.parquet")
    cap = dict(zip(s["url"], s["caption"]))
    assert cap["http://example.com/caption_latin1"] == "caf\ufffd cr\ufffdme"
    assert cap["http://example.com/caption_empty"] is None
    assert cap["http://example.com/caption_in_json"] == "from the json"
    counters = json.loads((root / "manifest/_manifest.json").read_text())["counts"]["counters"]
    assert counters["caption_non_utf8"] == 1 and counters["caption_empty"] == 1


def test_manifest_json_matches_its_schema(built):
    root, _, _ = built
    schema = json.loads((ROOT / "manifests/manifest.schema.json").read_text())
    meta = json.loads((root / "manifest/_manifest.json").read_text())
    assert validate(meta, schema) == []
    broken = dict(meta, paths="sideways", buckets=[{"id": 0}])
    assert len(validate(broken, schema)) >= 2                     # the checker is not a no-op


def validate(doc, schema, where="$") -> list[str]:
    """The subset of JSON Schema that manifest.schema.json uses (no jsonschema in the venv)."""
    errs = []
    types = schema.get("type")
    if types:
        types = [types] if isinstance(types, str) else types
        py = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
              "null": type(None), "boolean": bool}
        if not any(isinstance(doc, py[t]) and not (t in ("integer", "number") and isinstance(doc, bool))
                   for t in types):
            return [f"{where}: {type(doc).__name__} is not {types}"]
    if "enum" in schema and doc not in schema["enum"]:
        errs.append(f"{where}: {doc!r} not in {schema['enum']}")
    if "pattern" in schema and isinstance(doc, str):
        import re
        if not re.search(schema["pattern"], doc):
            errs.append(f"{where}: {doc!r} !~ {schema['pattern']}")
    if isinstance(doc, (int, float)) and not isinstance(doc, bool):
        if "minimum" in schema and doc < schema["minimum"]:
            errs.append(f"{where}: {doc} < {schema['minimum']}")
        if "exclusiveMinimum" in schema and doc <= schema["exclusiveMinimum"]:
            errs.append(f"{where}: {doc} <= {schema['exclusiveMinimum']}")
    if isinstance(doc, dict):
        errs += [f"{where}: missing {k}" for k in schema.get("required", []) if k not in doc]
        for k, v in doc.items():
            sub = schema.get("properties", {}).get(k, schema.get("additionalProperties"))
            if isinstance(sub, dict):
                errs += validate(v, sub, f"{where}.{k}")
    if isinstance(doc, list):
        if len(doc) < schema.get("minItems", 0) or len(doc) > schema.get("maxItems", 1 << 60):
            errs.append(f"{where}: {len(doc)} items")
        for i, v in enumerate(doc):
            errs += validate(v, schema.get("items", {}), f"{where}[{i}]")
    return errs


# --- DALI ------------------------------------------------------------------------------------------

def dali_decode(blobs: list[bytes]) -> list[tuple]:
    from nvidia.dali import fn, pipeline_def, types

    arrays = [np.frombuffer(b, dtype=np.uint8) for b in blobs]

    @pipeline_def(batch_size=len(arrays), num_threads=1, device_id=None, prefetch_queue_depth=1)
    def pipe():
        enc = fn.external_source(source=lambda: arrays, batch=True, dtype=types.UINT8)
        return fn.decoders.image(enc, device="cpu", output_type=types.RGB)

    p = pipe()
    p.build()
    (out,) = p.run()
    return [np.array(out[i]).shape for i in range(len(arrays))]


def kept_rows(manifest: Path):
    import polars as pl

    s = pl.read_parquet(manifest / "samples/*.parquet")
    blobs = []
    for shard, off, size in s.select("shard", "offset", "size").iter_rows():
        with open(manifest / shard, "rb") as f:
            f.seek(off)
            blobs.append(f.read(size))
    return s, blobs


def test_dali_cpu_decodes_every_kept_sample_at_its_display_size(built):
    """DALI aborts the pipeline on the first image it cannot decode: one batch of every kept sample of the
    hostile tars (CMYK, 16-bit, palette+tRNS, EXIF-rotated, MPO, trailing garbage, ...) must go through,
    and DALI's geometry (it applies EXIF itself) must equal the manifest's display size."""
    root, _, _ = built
    s, blobs = kept_rows(root / "manifest")
    shapes = dali_decode(blobs)
    assert [sh[:2] for sh in shapes] == list(zip(s["height"].to_list(), s["width"].to_list()))


def test_decode_level_rejects_bitrot_that_dali_cannot_decode(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = F.write_img2dataset_tar(shards / "00000.tar", F.bitrot() + F.catalogue()[:6])
    header = build_manifest([str(shards)], tmp_path / "m_header", progress=False, idx="none")
    decode = build_manifest([str(shards)], tmp_path / "m_decode", progress=False, idx="none", verify="decode")
    assert header["samples"] == 8 and header["rejects"] == 0      # header level cannot see inside the data
    assert decode["samples"] == 6 and decode["per_reason"] == {"corrupt": 2}
    s, blobs = kept_rows(tmp_path / "m_decode")
    assert len(dali_decode(blobs)) == 6
    assert set(s["key"]) == {k for k, c in keys.items() if c.expect == "keep"}


def test_dali_webdataset_reader_uses_the_idx_files(built):
    """The .idx beside each tar lists the kept samples only: DALI's own webdataset reader, given it, reads
    exactly the manifest's samples and never meets a rejected image."""
    from nvidia.dali import fn, pipeline_def, types

    root, _, _ = built
    import polars as pl

    shards = pl.read_parquet(root / "manifest/shards.parquet").filter(pl.col("idx").is_not_null())
    tars = [str((root / "manifest" / s).resolve()) for s in shards["shard"]]
    idx = shards["idx"].to_list()
    assert [Path(i).parent for i in idx] == [Path(t).parent for t in tars]   # beside the tars
    s = pl.read_parquet(root / "manifest/samples/*.parquet")

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def pipe():
        img, txt = fn.readers.webdataset(paths=tars, index_paths=idx, ext=["jpg;jpeg;png;webp", "txt"],
                                         missing_component_behavior="empty", random_shuffle=False)
        return fn.decoders.image(img, device="cpu", output_type=types.RGB), txt

    p = pipe()
    p.build()
    n = p.epoch_size()["__Webdataset_0"] if isinstance(p.epoch_size(), dict) else p.epoch_size()
    assert n == s.height
    shapes = []
    for _ in range(n):
        img, _txt = p.run()
        shapes.append(np.array(img[0]).shape[:2])
    assert sorted(shapes) == sorted(zip(s["height"].to_list(), s["width"].to_list()))


# --- resume, parts, merge --------------------------------------------------------------------------

def test_rerun_skips_done_tars_and_rebuilds_changed_ones(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        F.good_tar(shards / f"{i:05d}.tar", 5, start=100 * i, seed=i)
    out = tmp_path / "m"
    first = build_manifest([str(shards)], out, progress=False)
    assert (first["processed"], first["samples"], first["merged"]) == (3, 15, True)
    again = build_manifest([str(shards)], out, progress=False)
    assert (again["processed"], again["skipped"], again["samples"]) == (0, 3, 15)
    F.good_tar(shards / "00001.tar", 7, start=100, seed=9)            # the tar changed on disk
    third = build_manifest([str(shards)], out, progress=False)
    assert (third["processed"], third["samples"]) == (1, 17)
    stricter = build_manifest([str(shards)], out, progress=False, verify="decode")  # options changed
    assert stricter["processed"] == 3
    assert json.loads((out / "_manifest.json").read_text())["args"]["verify"] == "decode"


def test_parts_merge_when_all_are_done_and_match_a_single_run(tmp_path, built):
    root, _, _ = built
    shards = root / "shards"
    out = tmp_path / "m"
    a = build_manifest([str(shards)], out, part="0/2", progress=False, idx="none")
    assert not a["merged"] and a["missing"] == 2 and not (out / "_manifest.json").exists()
    with pytest.raises(ManifestBuildError, match="2 of 5 tars are not sharded yet"):
        merge_manifest(out, [str(shards)])
    b = build_manifest([str(shards)], out, part="1/2", progress=False, idx="none", workers=2)
    assert b["merged"] and (a["processed"], b["processed"]) == (3, 2)
    one = json.loads((root / "manifest/_manifest.json").read_text())["counts"]
    two = json.loads((out / "_manifest.json").read_text())["counts"]
    assert one == two
    merge_manifest(out)                                     # --merge-only without inputs: the parts found
    assert json.loads((out / "_manifest.json").read_text())["counts"] == one


def test_parts_of_tars_no_longer_in_the_inputs_stop_the_merge(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(2):
        F.good_tar(shards / f"{i:05d}.tar", 3, start=10 * i, seed=i)
    out = tmp_path / "m"
    build_manifest([str(shards)], out, progress=False, idx="none")
    with pytest.raises(ManifestBuildError, match="not among the inputs"):
        build_manifest([str(shards / "00000.tar")], out, progress=False, idx="none")


def test_bad_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ManifestBuildError, match="no such file"):
        resolve_inputs([str(tmp_path / "nope")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManifestBuildError, match="without \\*.tar"):
        resolve_inputs([str(tmp_path / "empty")])
    with pytest.raises(ManifestBuildError, match="0 <= i < N"):
        build_manifest([str(tmp_path)], tmp_path / "m", part="2/2")
    with pytest.raises(ManifestBuildError, match="--verify"):
        build_manifest([str(tmp_path)], tmp_path / "m", verify="pixels")


def test_idx_is_never_written_over_a_foreign_one(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    F.good_tar(shards / "00000.tar", 4)
    foreign = shards / "00000.idx"
    foreign.write_text("v1.2 1\nsomeone else's index\n")
    build_manifest([str(shards)], tmp_path / "m", progress=False)
    assert foreign.read_text() == "v1.2 1\nsomeone else's index\n"
    written = list((tmp_path / "m/idx").glob("*.idx"))
    assert len(written) == 1 and written[0].read_text().startswith("v1.2 4\n")
    build_manifest([str(shards)], tmp_path / "m2", progress=False, idx="manifest")
    assert len(list((tmp_path / "m2/idx").glob("*.idx"))) == 1


def test_a_crash_in_inspecting_costs_one_sample_and_bad_json_none(tmp_path, monkeypatch):
    import aimv2data.manifest.build as build

    real = build.inspect_image

    def flaky(data, *a):
        if data == poison:
            raise RuntimeError("decoder bug")
        return real(data, *a)

    poison = F.jpeg(50, 50, 77)
    shards = tmp_path / "shards"
    shards.mkdir()
    F.write_raw_tar(shards / "00000.tar", [
        ("a.jpg", F.jpeg(60, 40, 1)), ("a.json", b"\xff\xfe not json"),
        ("b.jpg", poison), ("b.json", b'{"url": 5, "uid": 17}'),
        ("c.jpg", F.jpeg(8, 8, 2))])
    monkeypatch.setattr(build, "inspect_image", flaky)
    r = build_manifest([str(shards)], tmp_path / "m", progress=False, min_side=10)
    assert r["samples"] == 1 and r["per_reason"] == {"corrupt": 1, "too_small": 1}
    import polars as pl

    rej = pl.read_parquet(tmp_path / "m/rejects/*.parquet").sort("key")
    assert rej["detail"][0] == "unexpected RuntimeError: decoder bug"
    assert rej["url"][0] is None and rej["uid"][0] == "17"          # a non-string url is dropped
    meta = json.loads((tmp_path / "m/_manifest.json").read_text())
    assert meta["counts"]["counters"]["json_errors"] == 1


def test_non_utf8_member_names_are_kept(tmp_path):
    import io
    import tarfile

    shards = tmp_path / "shards"
    shards.mkdir()
    with tarfile.open(shards / "0.tar", "w", format=tarfile.USTAR_FORMAT, encoding="latin-1") as tf:
        for name, data in [("caf\xe9.jpg", F.jpeg(30, 20)), ("caf\xe9.txt", "crème".encode("latin-1"))]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
    r = build_manifest([str(shards)], tmp_path / "m", progress=False)
    assert r["samples"] == 1 and not r["failed"]
    import polars as pl

    row = pl.read_parquet(tmp_path / "m/samples/*.parquet").row(0, named=True)
    assert (row["key"], row["member"], row["caption"]) == ("caf\ufffd", "caf\ufffd.jpg", "cr\ufffdme")


def test_cli_prints_a_summary(tmp_path):
    from cli.main import main

    shards = tmp_path / "shards"
    shards.mkdir()
    F.write_img2dataset_tar(shards / "00000.tar", F.catalogue()[:3] + F.catalogue()[-3:])
    res = CliRunner().invoke(main, ["shard", str(shards), "-o", str(tmp_path / "m")])
    assert res.exit_code == 0, res.output
    flat = " ".join(res.output.replace("│", " ").split())     # rich wraps long paths
    assert "kept 3 of 6 (50.0%)" in flat and "rejected 3: " in flat and "json written" in flat
    res = CliRunner().invoke(main, ["shard", str(tmp_path / "missing"), "-o", str(tmp_path / "m")])
    assert res.exit_code == 1 and "no such file or folder" in res.output


@pytest.mark.slow
def test_a_killed_run_leaves_only_whole_parts_and_a_rerun_finishes(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(8):
        cases = [F.Case(f"k{i}_{j}", "jpg", F.jpeg(1024, 768, 100 * i + j), "keep", (1024, 768),
                        meta={"url": f"u{i}_{j}"}) for j in range(30)]
        F.write_img2dataset_tar(shards / f"{i:05d}.tar", cases, start=1000 * i)
    out = tmp_path / "m"
    cmd = [sys.executable, "-m", "cli.main", "shard", str(shards), "-o", str(out), "--verify", "decode"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not list((out / "_parts").glob("*.json")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = list((out / "_parts").glob("*.json"))
    assert 1 <= len(done) < 8, "the run finished before it could be killed; make the tars bigger"
    assert not (out / "_manifest.json").exists()
    for f in (out / "samples").glob("*.parquet"):       # whatever exists under a final name is whole
        assert pq.read_table(f).num_rows == 30
    res = build_manifest([str(shards)], out, progress=False, verify="decode")
    assert res["skipped"] == len(done) and res["processed"] == 8 - len(done)
    assert res["merged"] and res["samples"] == 240
    assert not list(out.rglob(".*.tmp"))
    clean = tmp_path / "clean"
    shutil.copytree(shards, tmp_path / "shards2")
    build_manifest([str(tmp_path / "shards2")], clean, progress=False, verify="decode", idx="none")
    import polars as pl

    a = pl.read_parquet(out / "samples/*.parquet").drop("shard", "source").sort("key")
    b = pl.read_parquet(clean / "samples/*.parquet").drop("shard", "source").sort("key")
    assert a.equals(b)

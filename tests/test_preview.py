"""`aimv2 preview`: contact sheets and area pages of the batches the loader really makes."""
import json
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
import _train_fixtures  # noqa: E402

from aimv2data import preview as pv  # noqa: E402
from aimv2data.loader import Loader  # noqa: E402
from cli.main import main  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return _train_fixtures.build(tmp_path_factory.mktemp("preview_data"))[0]


def test_shown_batch_is_the_training_batch_with_true_annotations(manifest):
    loader = Loader(str(manifest), native_res=True, batch_patches=4096, seed=5, workers=0)
    while 512 not in pv._steps_by_area(loader):  # the first step at area 512 (a later segment with seed 5)
        pv._goto(loader, loader.segment + 1)
    assert loader.segment > 0
    i = pv._steps_by_area(loader)[512][0]
    shown = pv._show(loader, i)
    spec = loader.maker.spec(i)
    trainer = Loader(str(manifest), native_res=True, batch_patches=4096, seed=5, workers=0)
    # the trainer's path: one `for batch in loader` per segment, until that step
    batch = next(b for _ in range(100) for b in trainer if b.global_step == spec.global_step)
    assert torch.equal(shown.batch.images, batch.images) and shown.batch.captions == batch.captions
    assert shown.batch.global_step == batch.global_step == spec.global_step
    assert shown.batch.source_epoch == batch.source_epoch == spec.source_epoch
    assert shown.batch.area == 512 and len(shown.batch) == 4096 // 512
    t = loader.maker.tables[spec.source]
    for note, key in zip(shown.notes, batch.keys):
        assert note["key"] == key and not note["replaced"]
        assert note["bucket"] == shown.bucket  # native resolution: one bucket per step
        assert 0 < note["kept"] <= 1 and note["flip"] is False  # cover crop, no flip at native resolution
        H, W = batch.images.shape[2:]  # resize to cover: output px per source px = max of the two ratios
        assert note["upscale"] == pytest.approx(max(W / note["src"][0], H / note["src"][1]), rel=1e-6)
        assert note["kind"] in ("alt", "syn_demo")
    assert {t.key(int(r)) for r in spec.rows} == set(batch.keys)
    # the caption set named is the one whose caption the batch carries
    for note, row in zip(shown.notes, spec.rows):
        texts = t.texts(int(row))
        assert note["caption"] == (texts["caption"] if note["kind"] == "alt" else note["caption"])
        if note["kind"] != "alt":
            assert note["caption"] in texts[note["kind"]]


def test_preview_writes_sheets_area_pages_and_index(manifest, tmp_path):
    r = CliRunner().invoke(main, ["preview", str(manifest), "-o", str(tmp_path), "--native-res", "-C", "4096",
                                  "--batches", "2", "--areas", "512,1024", "--per-sheet", "6"])
    assert r.exit_code == 0, r.output
    s = json.loads((tmp_path / "preview.json").read_text())
    assert len(s["sheets"]) == 2 and [Path(p).name for p in s["areas"]] == ["area_0512.png", "area_1024.png"]
    index = (tmp_path / "index.html").read_text()
    for p in s["sheets"] + s["areas"]:
        with Image.open(p) as im:  # a real PNG, big enough to read
            # (a sheet of a wide bucket, w/h ~3, is one short row of images: ~1600 x 290 px)
            assert im.format == "PNG" and im.width > 800 and im.height > 250
        assert f"src='{Path(p).name}'" in index
    assert "A = 512" in index and "of C = 4096 patches" in index
    r = CliRunner().invoke(main, ["preview", str(manifest), "-o", str(tmp_path / "x"), "--native-res", "-C", "4096",
                                  "--areas", "8192"])
    assert r.exit_code != 0 and "no step at that area" in r.output
    r = CliRunner().invoke(main, ["preview", str(manifest), "-o", str(tmp_path / "y"), "--native-res", "-C", "4096",
                                  "--areas", "128", "--scan", "1", "--batches", "1"])
    assert r.exit_code != 0 and "no step at that area in the 2 steps" in r.output  # seed 0, segment 0: 512, 4096


def test_fixed_resolution_preview_and_stats_link(manifest, tmp_path):
    r = CliRunner().invoke(main, ["stats", str(manifest), "--plot", str(tmp_path)])
    assert r.exit_code == 0, r.output
    assert f"batches: aimv2 preview {manifest} -o {tmp_path / 'preview'}" in r.output  # how to make it
    s = pv.preview(manifest, tmp_path / "preview", batches=1, per_sheet=4, resolution=56, batch_size=8)
    assert [Path(p).name for p in s["areas"]] == ["area_0016.png"]  # (56 / 14)^2: one area
    assert s["settings"]["mode"] == "fixed resolution 56 px"
    assert len(s["sheets"]) == 1 and Path(s["sheets"][0]).is_file()
    r = CliRunner().invoke(main, ["stats", str(manifest), "--plot", str(tmp_path)])
    assert f"batches: {tmp_path / 'preview' / 'index.html'}" in r.output  # the link, once it exists

"""`aimv2 fetch` start-up (issue 23 point 10): what needs no download is refused before img2dataset, OpenCV,
torch or polars are imported (they take seconds), and img2dataset's own output goes to DIR/_logs, not the
terminal."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
from click.testing import CliRunner

from aimv2data.fetch import LOG_NAME
from cli.main import main

REPO = Path(__file__).resolve().parents[1]
HEAVY = ("img2dataset", "cv2", "torch", "polars")
# each case: the fetch flags; the child prints exit code, output and which heavy modules were loaded
PROBE = """
import json, sys
from click.testing import CliRunner
from cli.main import main
cases = json.loads(sys.argv[1])
for args in cases:
    r = CliRunner().invoke(main, ["fetch", *args])
    print(json.dumps({"code": r.exit_code, "output": r.output,
                      "heavy": [m for m in %r if m in sys.modules]}))
""" % (HEAVY,)


def _probe(cases: list[list[str]]) -> list[dict]:
    res = subprocess.run([sys.executable, "-c", PROBE, json.dumps(cases)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return [json.loads(line) for line in res.stdout.splitlines()]


def test_refusals_that_need_no_download_come_before_the_heavy_imports(tmp_path):
    from aimv2data.fetch.output import JOB_FORMAT, job_path
    from aimv2data.manifest.lock import output_lock

    lst = tmp_path / "list.parquet"
    lst.write_bytes(b"not read")                      # never opened by the cases below
    held = tmp_path / "held"                          # an earlier fetch's output, written to by another run now
    job_path(held).parent.mkdir(parents=True)
    job_path(held).write_text(json.dumps({"format": JOB_FORMAT, "settings": {}}))
    with output_lock(held, tool="aimv2 fetch", argv=["aimv2", "fetch", "--output", str(held)]):
        results = _probe([
            ["--source", "coyo", "--url-list", str(tmp_path / "nope.parquet"), "--output", str(tmp_path / "a")],
            ["--source", "coyo", "--url-list", str(lst), "--output", str(held)],
            ["--source", "coyo", "--url-list", str(lst), "--dfn-index", "x.npy", "--output", str(tmp_path / "b")],
            ["--source", "dfn", "--url-list", str(lst), "--output", str(tmp_path / "c")],
            ["--source", "coyo", "--url-list", str(lst), "--processes", "0", "--output", str(tmp_path / "d")],
        ])
    missing, locked, index_flag, no_index, bad_value = results
    assert "url list" in missing["output"] and "does not exist" in missing["output"]
    assert "being written by another `aimv2 fetch` run" in locked["output"]
    assert "--dfn-index applies to --source dfn only" in index_flag["output"]
    assert "--source dfn needs --dfn-index" in no_index["output"]
    assert bad_value["code"] == 2 and "--processes" in bad_value["output"]
    for r in results:
        assert r["code"] != 0 and r["heavy"] == [], r
    assert not any((tmp_path / d).exists() for d in "abcd")


def test_img2dataset_output_goes_to_the_log_and_a_failure_names_it(tmp_path, monkeypatch):
    """img2dataset prints from this process and from the processes it spawns (which write to file descriptor
    1 directly): both land in DIR/_logs/img2dataset.log; when it raises, the error names the log."""
    from aimv2data.fetch import download

    def chatty_failure(opts, out, job, n_shards, rnd):
        print("Downloading starting now, check your bandwidth speed (with bwm-ng)")
        subprocess.run([sys.executable, "-c", "print('worker  - success: 1.000 - count: 1')"], check=True)
        raise RuntimeError("the distributor broke")

    monkeypatch.setattr(download, "_download", chatty_failure)
    lst = tmp_path / "list.parquet"
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_parquet(lst)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["fetch", "--source", "parquet", "--url-list", str(lst), "--output", str(out)])
    log = (out / LOG_NAME).read_text()
    assert res.exit_code == 1
    assert "img2dataset failed (RuntimeError: the distributor broke)" in res.output
    assert str((out / LOG_NAME).resolve()) in res.output.replace("\n", "")
    assert "bwm-ng" not in res.output and "worker  -" not in res.output
    assert "bwm-ng" in log and "worker  - success" in log and "Traceback" in log
    assert json.loads((out / "fetch_summary.json").read_text())["log"] == str((out / LOG_NAME).resolve())


CHATTY_ON_A_TERMINAL = """
import subprocess, sys
from aimv2data.fetch import download

def chatty_failure(opts, out, job, n_shards, rnd):
    print("Downloading starting now, check your bandwidth speed (with bwm-ng)")
    subprocess.run([sys.executable, "-c", "print('worker  - success: 1.000 - count: 1')"], check=True)
    raise RuntimeError("the distributor broke")

download._download = chatty_failure
from cli.main import main
main(["fetch", "--source", "parquet", "--url-list", sys.argv[1], "--output", sys.argv[2]])
"""


def test_on_a_terminal_too_img2dataset_output_stays_in_the_log(tmp_path):
    """On a terminal our progress line is live (rich would catch what others print and show it above the bar):
    img2dataset's lines still go to the log only."""
    import os
    import pty

    lst, out = tmp_path / "list.parquet", tmp_path / "out"
    pl.DataFrame({"url": ["http://127.0.0.1:9/a.jpg"], "caption": ["a"]}).write_parquet(lst)
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-c", CHATTY_ON_A_TERMINAL, str(lst), str(out)], cwd=REPO,
                            stdin=child_fd, stdout=child_fd, stderr=child_fd, env={**os.environ, "COLUMNS": "200"})
    os.close(child_fd)
    screen = b""
    while True:
        try:
            chunk = os.read(main_fd, 65536)
        except OSError:          # EIO: the child closed the terminal
            break
        if not chunk:
            break
        screen += chunk
    os.close(main_fd)
    assert proc.wait(timeout=60) == 1
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.decode(errors="replace"))    # colours, cursor moves
    assert "img2dataset failed (RuntimeError: the distributor broke)" in text and "0/1 shards" in text
    assert "bwm-ng" not in text and "worker  -" not in text
    log = (out / LOG_NAME).read_text()
    assert "bwm-ng" in log and "worker  - success" in log


def test_settings_and_from_settings_are_one_mapping():
    """--retry-failed --output DIR reads the options back from the job's record: `from_settings` inverts
    `settings()` (issue 23 point 1: no second, hand-written mapping)."""
    from aimv2data.fetch import FetchOptions

    for source, extra in (("parquet", {"url_col": "image", "caption_col": None}), ("coyo", {})):
        made = FetchOptions(source=source, url_lists=["l.parquet"], output="o", shard_size=7, limit=3, max_side=0,
                            max_pixels=1000, verify_hash=False, keep_progressive=True, quality=80, **extra)
        bare = FetchOptions(source=None, url_lists=[], output="o", retry_failed=True)
        back = bare.from_settings(made.settings())
        assert back.settings() == made.settings() and not back.differences(made.settings())
        assert (back.retry_failed, back.url_lists) == (True, [])       # what is not a setting stays the caller's
    import dataclasses

    assert dataclasses.replace(made, shard_size=8).differences(made.settings()) == ["shard_size: 7 -> 8"]

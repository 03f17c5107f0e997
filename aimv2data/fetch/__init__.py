"""`aimv2 fetch`: url lists -> webdataset shards at native resolution, by img2dataset.

    from aimv2data.fetch import FetchOptions, fetch
    summary = fetch(FetchOptions(source="coyo", url_lists=["coyo.parquet"], output="shards/"))

Output layout (img2dataset's own, plus a few things of ours; output.py names them):
    DIR/NNNNN.tar              KEY.jpg, KEY.txt (caption), KEY.json (img2dataset's sample json + our columns)
    DIR/NNNNN.parquet          one row per attempted sample: key, url, status, error_message, sizes, ...
    DIR/NNNNN_stats.json       written by img2dataset after the tar is closed: the shard is complete
    DIR/fetch_summary.json     written when a run ends (absent while a run is in progress)
    DIR/_input/                the normalised url list parts img2dataset reads + fetch_job.json
    DIR/_logs/img2dataset.log  img2dataset's own output (its workers' lines, its tqdm), appended per run

One writer: a run holds DIR/.lock (aimv2 shard's flock lock, aimv2data/manifest/lock.py) from its first
write to its end; a second run into DIR is refused, naming the holder. Not for a URL output (no flock).

Resume: a shard is done when its _stats.json parses, its tar exists and its parquet reads with one row per
attempted sample (a broken parquet behind a complete-looking tar is redone). Before downloading, shards
that are not done lose their partial tar/parquet (img2dataset would overwrite them anyway, but a
crash must never leave a partial tar that a reader could mistake for data), then img2dataset's
incremental mode skips the done ones. A rerun of a finished job reads nothing from the network and
writes nothing.

Modules, in the order a run meets them: options (FetchOptions and the checks that need only them), output
(the directory: lock, job file, shard names, resume sweep), input (url lists, sources, the DFN index),
prepare (url lists -> DIR/_input), download (one img2dataset call: guard.py's downloader, resize.py's
resizer, its output to the log, our progress line), watch (its download workers watched: a dead one ends the
call), retry (--retry-failed rounds), summary, run (fetch and retry_failed), errors (FetchError,
FetchIncomplete). Importing this face is cheap: img2dataset, OpenCV and polars load when a download runs.
"""
from aimv2data.fetch.errors import FetchError, FetchIncomplete
from aimv2data.fetch.input import uid_pairs
from aimv2data.fetch.options import DEFAULT_MAX_PIXELS, DISTRIBUTORS, SOURCES, FetchOptions
from aimv2data.fetch.output import LOG_NAME
from aimv2data.fetch.run import fetch, retry_failed
from aimv2data.fetch.summary import SUMMARY_NAME

__all__ = ["DEFAULT_MAX_PIXELS", "DISTRIBUTORS", "LOG_NAME", "SOURCES", "SUMMARY_NAME", "FetchError",
           "FetchIncomplete", "FetchOptions", "fetch", "retry_failed", "uid_pairs"]

"""`aimv2 fetch --retry-failed`: download again what failed for a passing reason, and only that.

img2dataset records every attempted sample in DIR/NNNNN.parquet (status, error message) but cannot
re-download selectively. A retry round reads those records, keeps the samples whose LAST attempt
failed transiently (time-outs, connection errors, HTTP 429 and 5xx; not 404/403, not-an-image, bombs),
and downloads them with img2dataset's "extend" mode into new shards of the same output, numbered after
the last one. Each retried row carries `retry_of`: the key of its first attempt, so a sample's attempts
form a lineage and a recovered sample is never retried again (exactly once in the shards). A round is
derived from the finished shards only, so an interrupted round is simply planned again; with nothing
left to retry, a round changes nothing.

The rounds are recorded in the job file (output.job_path: `retry_rounds`); fetch_summary.json gets a
`retries` section: what each round tried and recovered, and the failures by reason after all rounds.
"""
from __future__ import annotations

import io
import math

from aimv2data.fetch.summary import read_stats, reason_class
from aimv2data.fetch.errors import FetchError
from aimv2data.fetch.output import INPUT_DIR, JOB_NAME, name_width, shard_count, write_if_changed, write_job

RETRY_COL = "retry_of"


def transient(reason: str) -> bool:
    """Failures that may succeed later: the server or the network, not the sample."""
    if reason in ("timeout", "connection_error"):
        return True
    if reason.startswith("http_"):
        code = reason[5:]
        return code == "429" or (code.isdigit() and 500 <= int(code) < 600)
    return False


def attempts(out, job: dict, names: list[str]):
    """Every attempt of every sample in the finished shards: key, lineage, round, status, reason, and the
    url-list columns needed to try again."""
    import polars as pl

    from aimv2data.storage import read_parquet

    rounds = {n: 0 for n in names}
    for r in job.get("retry_rounds", []):
        rounds.update({n: r["round"] for n in r["shards"]})
    frames = []
    for name, rnd in rounds.items():
        if read_stats(out / f"{name}_stats.json") is None or not (out / f"{name}.parquet").is_file():
            continue
        df = read_parquet(out / f"{name}.parquet")
        if RETRY_COL not in df.columns:
            df = df.with_columns(pl.lit(None, pl.String).alias(RETRY_COL))
        frames.append(df.with_columns(pl.lit(rnd).alias("_round")))
    if not frames:
        return None
    df = pl.concat(frames, how="diagonal_relaxed")
    return df.with_columns(
        pl.coalesce(RETRY_COL, "key").alias("_lineage"),
        pl.col("error_message").map_elements(reason_class, return_dtype=pl.String).alias("_reason"))


def last_attempts(df):
    import polars as pl

    return df.sort(["_round", "key"]).group_by("_lineage", maintain_order=True).last().filter(
        pl.col("_lineage").is_not_null())


def plan(out, job: dict, names: list[str]):
    """The rows to try again (url-list columns + retry_of), in lineage order."""
    import polars as pl

    df = attempts(out, job, names)
    if df is None:
        return None
    last = last_attempts(df)
    todo = last.filter((pl.col("status") != "success")
                       & pl.col("_reason").map_elements(transient, return_dtype=pl.Boolean))
    cols = [c for c in job["columns"] if c in todo.columns]
    return todo.sort("_lineage").select(*cols, pl.col("_lineage").alias(RETRY_COL))


def retry_section(out, job: dict, names: list[str]) -> dict:
    """What each round tried and recovered, and the failures by reason once every round is counted."""
    import polars as pl

    df = attempts(out, job, names)
    rounds = []
    for r in job.get("retry_rounds", []):
        sub = df.filter(pl.col("_round") == r["round"]) if df is not None else None
        done = [n for n in r["shards"] if read_stats(out / f"{n}_stats.json") is not None]
        rounds.append({"round": r["round"], "to_retry": r["to_retry"], "shards": done,
                       "recovered": int((sub["status"] == "success").sum()) if sub is not None else 0,
                       "failed_again": int((sub["status"] != "success").sum()) if sub is not None else 0})
    final = {}
    if df is not None:
        last = last_attempts(df)
        failed = last.filter(pl.col("status") != "success")
        final = {k: v for k, v in sorted(failed.group_by("_reason").len().iter_rows(), key=lambda kv: (-kv[1], kv[0]))}
        success = int((last["status"] == "success").sum())
    else:
        success = 0
    return {"rounds": rounds, "success_after_retries": success, "failures_by_reason_after_retries": final,
            "still_transient": sum(v for k, v in final.items() if transient(k))}


def prepare_round(opts, out, job: dict, names: list[str]):
    """Plan the next round; write its url list and record it in the job. Returns (shard names, rows) or
    (None, 0) when nothing is left to retry."""
    todo = plan(out, job, names)
    if todo is None or todo.height == 0:
        return None, 0
    rounds = job.setdefault("retry_rounds", [])
    # an interrupted round's unfinished shards were swept: they are planned again in this round
    finished = {n for n in names + [s for r in rounds for s in r["shards"]]
                if read_stats(out / f"{n}_stats.json") is not None}   # each stats file read once
    for r in rounds:
        r["shards"] = [n for n in r["shards"] if n in finished]
    existing = [int(n) for n in names + [s for r in rounds for s in r["shards"]] if n in finished]
    start = max(existing, default=-1) + 1    # what img2dataset's "extend" mode numbers from
    width = name_width(shard_count(job, opts.shard_size))
    shards = [f"{start + i:0{width}d}" for i in range(math.ceil(todo.height / opts.shard_size))]
    rnd = max((r["round"] for r in rounds), default=0) + 1
    folder = out / INPUT_DIR / f"retry-{rnd:03d}"
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    todo.write_parquet(buf)
    write_if_changed(folder / "part-00000.parquet", buf.getvalue())
    rounds.append({"round": rnd, "to_retry": todo.height, "shards": shards, "url_list": f"retry-{rnd:03d}"})
    write_job(out, job)
    return shards, todo.height


def check_retry_target(out, job: dict | None) -> dict:
    if job is None:
        raise FetchError(f"{out} is not an aimv2 fetch output (no {INPUT_DIR}/{JOB_NAME}): --retry-failed retries "
                         "the failed downloads of a finished `aimv2 fetch` into that directory", "output")
    return job

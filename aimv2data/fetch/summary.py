"""The end-of-fetch summary: img2dataset's per-shard `NNNNN_stats.json` (counts and a `status_dict`
of messages) aggregated into successes, failures by reason and throughput; written as
DIR/fetch_summary.json and printed as one screen.

The summary is a pure function of the shard stats and the job file, so a rerun that fetched nothing
produces the same bytes (and fetch then leaves the file, and its mtime, alone).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

SUMMARY_NAME = "fetch_summary.json"
SUMMARY_FORMAT = "aimv2-fetch-summary/1"
RECORD_COLUMNS = ("key", "url", "status", "error_message")   # what the summary reads of a shard's parquet


def reason_class(message: str) -> str:
    """img2dataset / NativeResizer error message -> a short, stable reason name."""
    m = (message or "").lower()
    if m.startswith("refused"):  # guard.py: never connected, never retried
        return "refused_scheme" if " scheme " in m else "refused_link_local" if "link-local" in m \
            else "refused_private"
    if m.startswith("http error"):
        code = re.search(r"http error (\d+)", m)
        return f"http_{code.group(1)}" if code else "http_error"
    if "timed out" in m or "timeout" in m:
        return "timeout"
    if "x-robots-tag" in m:
        return "opt_out"
    if "hash mismatch" in m:
        return "hash_mismatch"
    if m == "empty body":
        return "empty_body"
    if m.startswith("html/xml page"):
        return "html_body"
    if "truncated" in m:
        return "truncated"
    if m.startswith("image too large") or "decompression bomb" in m:
        return "too_large"
    if m == "image too small":
        return "too_small"
    if m.startswith("aspect ratio"):
        return "aspect_ratio"
    if m.startswith("undecodable") or "decoding error" in m:
        return "undecodable"
    if "ssl" in m or "certificate" in m:
        return "ssl_error"
    if "unknown url type" in m or "no host given" in m or "invalid url" in m:
        return "bad_url"
    if "urlopen error" in m or "connection" in m or "remote end closed" in m or "errno" in m:
        return "connection_error"
    return "other"


def read_stats(path: Path) -> dict | None:
    """A shard's stats, or None when absent or not the complete json img2dataset writes last."""
    try:
        s = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    keys = ("count", "successes", "failed_to_download", "failed_to_resize", "start_time", "end_time", "status_dict")
    return s if isinstance(s, dict) and all(k in s for k in keys) else None


def busy_seconds(spans: list[tuple[float, float]]) -> float:
    """Length of the union of [start, end] spans: wall time spent fetching, across resumed runs,
    without the gaps between them."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(spans):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def failure_examples(out: Path, shard_names: list[str], per_reason: int = 3) -> dict[str, list[dict]]:
    """A few named failures per reason (key, url, message) from img2dataset's per-shard parquet."""
    import polars as pl

    from aimv2data.storage import read_parquet

    files = [out / f"{n}.parquet" for n in shard_names if (out / f"{n}.parquet").is_file()]
    if not files:
        return {}
    df = (pl.concat([read_parquet(f, columns=list(RECORD_COLUMNS)) for f in files], how="vertical_relaxed")
          .filter(pl.col("status") != "success").sort("key"))
    examples: dict[str, list[dict]] = {}
    for key, url, _, msg in df.iter_rows():
        lst = examples.setdefault(reason_class(msg), [])
        if len(lst) < per_reason:
            lst.append({"key": key, "url": url, "error": msg})
    return dict(sorted(examples.items()))


def build(out: Path, job: dict, shard_names: list[str], log) -> dict:
    """The summary of the job in `out`; `log` is where img2dataset's own output goes (output.log_path)."""
    totals = Counter()
    messages: Counter[str] = Counter()
    spans, done, missing = [], [], []
    for name in shard_names:
        s = read_stats(out / f"{name}_stats.json")
        if s is None or not (out / f"{name}.tar").is_file():
            missing.append(name)
            continue
        done.append(name)
        for k in ("count", "successes", "failed_to_download", "failed_to_resize"):
            totals[k] += int(s[k])
        messages.update({k: int(v) for k, v in s["status_dict"].items() if k != "success"})
        spans.append((float(s["start_time"]), float(s["end_time"])))
    reasons: Counter[str] = Counter()
    for msg, n in messages.items():
        reasons[reason_class(msg)] += n
    busy = busy_seconds(spans)
    return {
        "format": SUMMARY_FORMAT,
        "complete": not missing,
        "output": _shown(out),
        "log": _shown(log),
        "source": job["settings"]["source"],
        "settings": job["settings"],
        "input": job["input"],
        "shards": {"expected": len(shard_names), "done": len(done), "missing": missing},
        "samples": {"attempted": totals["count"], "success": totals["successes"],
                    "failed_to_download": totals["failed_to_download"],
                    "failed_to_resize": totals["failed_to_resize"]},
        "failures_by_reason": dict(sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))),
        "failure_messages": dict(sorted(messages.items(), key=lambda kv: (-kv[1], kv[0]))[:50]),
        "failure_examples": failure_examples(out, done),
        "busy_seconds": round(busy, 3),
        "samples_per_second": round(totals["count"] / busy, 2) if busy > 0 else None,
    }


def _shown(path) -> str:
    return str(path) if "://" in str(path) else str(Path(path).resolve())


def render(summary: dict, run_seconds: float | None = None, fetched_now: int = 0) -> "object":
    """One screen: what was fetched, what failed and why, how fast, where it is."""
    from rich.console import Group
    from rich.panel import Panel
    from rich.table import Table

    s, sh, inp = summary["samples"], summary["shards"], summary["input"]
    attempted = max(1, s["attempted"])
    head = Table.grid(padding=(0, 2))
    head.add_column(style="bold")
    head.add_column()
    state = "[green]complete[/]" if summary["complete"] else f"[red]incomplete[/]: {len(sh['missing'])} shard(s) missing"
    head.add_row("output", f"{summary['output']}  ({state})")
    filt = f", {inp.get('not_in_index', 0)} not in the DFN index" if summary["source"] == "dfn" else ""
    head.add_row("input", f"{inp['rows']} rows in {inp['files']} file(s) -> {inp['kept']} to fetch "
                          f"({inp.get('no_url', 0)} without url{filt})")
    head.add_row("shards", f"{sh['done']}/{sh['expected']} done")
    head.add_row("success", f"{s['success']} / {s['attempted']} ({100 * s['success'] / attempted:.1f}%)")
    head.add_row("failed", f"{s['failed_to_download']} to download, {s['failed_to_resize']} to decode/resize")
    rate = summary["samples_per_second"]
    speed = f"{rate:.1f} samples/s over {summary['busy_seconds']:.1f} s of shard work" if rate else "n/a"
    if run_seconds is not None and fetched_now:
        speed += f"; this run: {fetched_now} samples in {run_seconds:.1f} s ({fetched_now / run_seconds:.1f}/s)"
    head.add_row("speed", speed)
    head.add_row("log", f"{summary['log']}  (img2dataset's own output)")
    parts = [head]
    if summary["failures_by_reason"]:
        t = Table(title="failures by reason", title_justify="left", show_edge=False)
        t.add_column("reason")
        t.add_column("count", justify="right")
        t.add_column("example")
        ex = summary["failure_examples"]
        for reason, n in list(summary["failures_by_reason"].items())[:10]:
            e = ex.get(reason, [{}])[0]
            t.add_row(reason, str(n), f"{e.get('key', '')} {e.get('url', '')} {str(e.get('error', ''))[:60]}".strip())
        parts.append(t)
    if "retries" in summary:
        parts.append(_retries_line(summary["retries"]))
    out = summary["output"]
    parts.append(f"shards: {out}/NNNNN.tar · per-sample status: {out}/NNNNN.parquet · summary: {out}/{SUMMARY_NAME}")
    return Panel(Group(*parts), title="aimv2 fetch", expand=False)


def _retries_line(r: dict) -> str:
    last = r["rounds"][-1] if r["rounds"] else {}
    return (f"retries: round {last.get('round')} recovered {last.get('recovered', 0)} of {last.get('to_retry', 0)}; "
            f"after all rounds {r['success_after_retries']} succeeded, failures by reason "
            f"{r['failures_by_reason_after_retries']}")

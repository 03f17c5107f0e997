"""The check's figures as plain text (no rich: the GPU machine may lack it)."""
from __future__ import annotations

import json

from . import PARTS


def row_line(r: dict) -> str:
    """One row of the steps part."""
    head = f"{r['resolution']:6s} {r['attention']:4s} {'compiled' if r['compile'] else 'eager':8s}"
    if r.get("status", "ok") != "ok":
        return f"{head} {r.get('status', '?')}: {r.get('reason', '')}"
    return (f"{head} B={r['batch']:<4d} {r['step_ms']:9.1f} ms/step {r['images_per_s']:9.1f} img/s "
            f"MFU {100 * r['mfu']:5.1f}%")


def _env(rec: dict) -> list[str]:
    return [f"torch {rec['torch']} cuda {rec['cuda']} {rec.get('gpu', 'no GPU')}; missing: "
            f"{', '.join(rec['missing']) or 'none'}"]


def _peak(rec: dict) -> list[str]:
    return [f"{rec['dtype']} matmul peak {rec['tflops']:.4g} TFLOP/s (n = {rec['n']})"]


def _steps(rec: dict) -> list[str]:
    return [f"MFU over {rec['peak_tflops']:.4g} TFLOP/s ({rec['peak_source']}), as the trainer's",
            *(row_line(r) for r in rec["rows"])]


def _parity(rec: dict) -> list[str]:
    return [f"within tolerance {rec['within_tolerance']} ({rec['tolerance']}): " + json.dumps(rec["cpu_vs_device"])]


def _decode(rec: dict) -> list[str]:
    lines = []
    for dec in ("pil", "dali"):
        d = rec.get(dec, {})
        if d.get("status", "ok") != "ok":
            lines.append(f"{dec}: {d.get('status')}: {d.get('reason')}")
        else:
            lines.append(f"{dec}: fixed {d['fixed']['images_per_s']:.1f} img/s, native "
                         f"{d['native']['images_per_s']:.1f} img/s")
    return lines


def trainer_lines(run: str, r: dict) -> list[str]:
    """One trainer run: throughput against the synthetic step, waits, memory, compiles, syncs, SIGTERM."""
    if r.get("status") != "ok":
        return [f"{run}: {r.get('status')}: {r.get('reason', '')}"]
    syn, mem, comp = r["synthetic"], r["peak_memory"], r["compile"]
    syncs = r["host_syncs"].get("per_step"), syn["host_syncs"].get("per_step")
    lines = [f"{run}: {r['images_per_s']:.1f} img/s end to end vs {syn['images_per_s']:.1f} synthetic = "
             f"{r.get('efficiency', float('nan')):.3f} (goal 0.95); data wait {r['data_wait_ms_mean']:.1f} ms/step "
             f"(max {r['data_wait_ms_max']:.1f}); {r['timed_steps']} steps, grids {r['grids']}",
             f"  memory {json.dumps({k: round(v, 2) for k, v in mem.items() if isinstance(v, float)})}; "
             f"graphs {comp['graphs']}, compile {comp['compile_s']} s, recompiles {comp['recompiles']}; "
             f"host syncs/step {syncs[0]} (loop) {syncs[1]} (train_step); devices {r.get('devices')}"]
    if "sigterm_resume" in r:
        s = r["sigterm_resume"]
        lines.append(f"  SIGTERM at step {s['stopped_at']}: {s['status_after_sigterm']} (exit {s['exit_code']}), "
                     f"checkpoint in {s['save_s']} s; --resume: {s.get('resumed_status')} from "
                     f"{s.get('resumed_from')} to {s.get('final_step')} ({s['status']})")
    return lines


def _trainer(rec: dict) -> list[str]:
    head = (f"decoder {rec['decoder']}; payload {rec['payload']['images']} photos, "
            f"{rec['payload']['megapixels_mean']:.2f} MP mean")
    return [head, *(line for run, r in rec["runs"].items() for line in trainer_lines(run, r))]


LINES = {"env": _env, "peak": _peak, "steps": _steps, "parity": _parity, "decode": _decode, "trainer": _trainer}


def table(result: dict) -> str:
    """The whole check: a line per part, its figures indented below it."""
    lines = [f"aimv2 bench gpu ({'dry run, ' if result['dry_run'] else ''}{result['device']}, "
             f"{result.get('seconds', 0):.0f} s)"]
    for name in PARTS:
        rec = result["parts"].get(name, {})
        lines.append(f"- {name}: {rec.get('status')}" + (f" ({rec['reason']})" if "reason" in rec else ""))
        if rec.get("status") == "ok":
            lines += [f"    {line}" for line in LINES[name](rec)]
    return "\n".join(lines)

"""Benchmark results on disk, and their rendering as markdown tables and plots.

Files: `<out>/<YYYY-MM-DD>_<device-slug>.{json,csv,md}` (date of the run, UTC; slug of the device
name, e.g. `2026-05-09_nvidia-h100-80gb-hbm3`). JSON and CSV are appended to, so several runs of
one day on one device accumulate; the markdown is re-rendered from the whole JSON each time, the
latest row winning where a case was run twice. Plots: `<stem>_<op>_<dtype>.png`, latency (p50,
with the p20–p80 band) against problem size, and % of the run's copy bandwidth, per provider.
"""
from __future__ import annotations

import csv
import json
import math
import re
from collections import OrderedDict
from pathlib import Path
from typing import Sequence

from fastfuse.benchmark.harness import FIELDS


def device_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return slug or "unknown-device"


def results_stem(out_dir: str | Path, date: str, device: str) -> Path:
    return Path(out_dir) / f"{date[:10]}_{device_slug(device)}"


def append_json(rows: Sequence[dict], path: Path) -> list[dict]:
    """Append rows to the JSON list at `path`; returns everything the file now holds."""
    existing = []
    if path.exists():
        text = path.read_text()
        existing = json.loads(text) if text.strip() else []
    existing.extend(rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(existing, indent=1, default=_json_default) + "\n")
    return existing


def _json_default(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return str(value)


def append_csv(rows: Sequence[dict], path: Path) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits=3) -> str:
    if value is None or value == "":
        return "-"
    if isinstance(value, float):
        if not math.isfinite(value):
            return "-"
        if abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _latest(rows: Sequence[dict]) -> list[dict]:
    """One row per (op, case, dtype, mode, provider): the last one written."""
    keep: "OrderedDict[tuple, dict]" = OrderedDict()
    for row in rows:
        key = (row.get("op"), row.get("case"), row.get("dtype"), row.get("mode"), row.get("provider"))
        keep.pop(key, None)
        keep[key] = row
    return list(keep.values())


def render_markdown(rows: Sequence[dict], *, include_skipped: bool = True) -> str:
    """Per case, providers fastest first, with the speed-up against the best reference or peer."""
    rows = _latest(rows)
    probes = [r for r in rows if r.get("kind") == "probe"]
    groups: "OrderedDict[tuple, list[dict]]" = OrderedDict()
    for row in rows:
        if row.get("kind") == "probe":
            continue
        groups.setdefault((row["op"], row["case"], row["dtype"], row["mode"]), []).append(row)
    lines = []
    if rows:
        first = rows[0]
        lines.append(f"# fastfuse benchmark — {first.get('device')} ({first.get('arch')})")
        lines.append("")
        lines.append(f"torch {first.get('torch')}, triton {first.get('triton')}, fastfuse {first.get('fastfuse')}, "
                     f"CUDA {first.get('cuda') or 'none'}, commit {first.get('git_commit')}, timer {first.get('timer')}")
        if first.get("timer") == "perf_counter":
            lines.append("")
            lines.append("CPU run (time.perf_counter, no cache flush): smoke numbers only; GPU numbers need a GPU.")
    for probe in probes:
        lines.append("")
        lines.append(f"Copy bandwidth ({probe.get('shape')}, {probe.get('date')}): {_fmt(probe.get('gbps'))} GB/s "
                     "— the denominator of “% copy BW”.")
    summary = []
    for (op, case, dtype, mode), group in groups.items():
        ok = [r for r in group if r.get("status") == "ok" and r.get("p50_ms")]
        baseline = [r for r in ok if r.get("kind") in ("reference", "peer")]
        best_peer = min(baseline, key=lambda r: r["p50_ms"]) if baseline else None
        ours = [r for r in ok if r.get("kind") == "fastfuse"]
        best_ours = min(ours, key=lambda r: r["p50_ms"]) if ours else None
        lines += ["", f"## {op} — {case} — {dtype} — {mode}", "",
                  "| provider | p50 ms | p20–p80 ms | GB/s | % copy BW | TFLOP/s | peak MB | × vs best peer | note |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
        for row in sorted(ok, key=lambda r: r["p50_ms"]):
            ratio = f"{best_peer['p50_ms'] / row['p50_ms']:.2f}×" if best_peer else "-"
            lines.append(f"| {row['provider']} | {_fmt(row['p50_ms'])} | {_fmt(row['p20_ms'])}–{_fmt(row['p80_ms'])} | "
                         f"{_fmt(row.get('gbps'))} | {_fmt(row.get('pct_copy_bw'))} | {_fmt(row.get('tflops'))} | "
                         f"{_fmt(row.get('peak_mb'))} | {ratio} | {_cell(row.get('note'))} |")
        for row in group:
            if row.get("status") != "ok" and (include_skipped or row.get("status") == "error"):
                lines.append(f"| {row['provider']} | {row['status']} | | | | | | | {_cell(row.get('note'))} |")
        if best_ours:
            speedup = f"{best_peer['p50_ms'] / best_ours['p50_ms']:.2f}×" if best_peer else "-"
            summary.append(f"| {op} | {case} | {dtype} | {mode} | {best_ours['provider']} "
                           f"{_fmt(best_ours['p50_ms'])} | {best_peer['provider'] + ' ' + _fmt(best_peer['p50_ms']) if best_peer else '-'} "
                           f"| {speedup} |")
    if summary:
        lines += ["", "## Summary: best fastfuse provider against the best reference or peer", "",
                  "| op | case | dtype | mode | fastfuse (p50 ms) | best peer (p50 ms) | speed-up |",
                  "| --- | --- | --- | --- | --- | --- | ---: |"] + summary
    return "\n".join(lines) + "\n"


def write_plots(rows: Sequence[dict], stem: Path) -> list[Path]:
    """Latency and % of copy bandwidth against size, per op and dtype; [] if matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return []
    rows = [r for r in _latest(rows) if r.get("status") == "ok" and r.get("kind") != "probe" and r.get("p50_ms")]
    written = []
    for op in dict.fromkeys(r["op"] for r in rows):
        for dtype in dict.fromkeys(r["dtype"] for r in rows if r["op"] == op):
            sel = [r for r in rows if r["op"] == op and r["dtype"] == dtype]
            modes = list(dict.fromkeys(r["mode"] for r in sel))
            fig, axes = plt.subplots(2, len(modes), figsize=(6 * len(modes), 8), squeeze=False)
            for col, mode in enumerate(modes):
                per_mode = [r for r in sel if r["mode"] == mode]
                for provider in dict.fromkeys(r["provider"] for r in per_mode):
                    pts = sorted((r for r in per_mode if r["provider"] == provider), key=lambda r: r["size"])
                    sizes = [r["size"] for r in pts]
                    axes[0][col].plot(sizes, [r["p50_ms"] for r in pts], marker="o", label=provider)
                    axes[0][col].fill_between(sizes, [r["p20_ms"] for r in pts], [r["p80_ms"] for r in pts], alpha=0.2)
                    pct = [(r["size"], r["pct_copy_bw"]) for r in pts if r.get("pct_copy_bw") is not None]
                    if pct:
                        axes[1][col].plot([p[0] for p in pct], [p[1] for p in pct], marker="o", label=provider)
                sizes = [r["size"] for r in per_mode]
                # A log axis only where sizes span a decade; otherwise it would show no tick at all.
                xscale = "log" if max(sizes) > 10 * min(sizes) else "linear"
                axes[0][col].set(xscale=xscale, yscale="log", xlabel="problem size (elements of the main input)",
                                 ylabel="p50 latency (ms)", title=f"{op} {dtype} {mode}")
                axes[1][col].set(xscale=xscale, xlabel="problem size (elements of the main input)",
                                 ylabel="% of copy bandwidth")
                for ax in axes[:, col]:
                    ax.xaxis.set_major_formatter(ticker.EngFormatter())
                    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
                    ax.grid(True, which="both", alpha=0.3)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=8)
            device = sel[0].get("device", "")
            fig.suptitle(f"fastfuse {op} — {device} — {sel[0].get('date', '')[:10]}")
            fig.tight_layout()
            path = Path(f"{stem}_{op}_{dtype}.png")
            fig.savefig(path, dpi=90)
            plt.close(fig)
            written.append(path)
    return written


def _cell(text) -> str:
    """A note as one markdown table cell: an error message's newlines and pipes would break the row."""
    return " ".join(str(text or "").split()).replace("|", "\\|")


def write_results(rows: Sequence[dict], out_dir: str | Path, *, plots: bool = True) -> dict:
    """Append rows to the day's JSON/CSV, re-render its markdown and plots; returns the paths."""
    if not rows:
        raise ValueError("fastfuse bench: no rows to write")
    stem = results_stem(out_dir, rows[0]["date"], rows[0]["device"])
    json_path, csv_path, md_path = (stem.with_name(stem.name + ext) for ext in (".json", ".csv", ".md"))
    everything = append_json(rows, json_path)
    append_csv(rows, csv_path)
    md_path.write_text(render_markdown(everything))
    written = {"json": json_path, "csv": csv_path, "md": md_path}
    if plots:
        written["plots"] = write_plots(everything, stem)
    return written


def load_rows(path: str | Path) -> list[dict]:
    path = Path(path)
    if path.suffix == ".csv":
        with path.open() as f:
            rows = list(csv.DictReader(f))
        for row in rows:
            for key in ("p50_ms", "p20_ms", "p80_ms", "gbps", "tflops", "pct_copy_bw", "peak_mb"):
                row[key] = float(row[key]) if row.get(key) not in (None, "") else None
            row["size"] = int(row["size"]) if row.get("size") else 0
        return rows
    return json.loads(path.read_text())


def rerender(path: str | Path, *, plots: bool = True) -> dict:
    """Rebuild the markdown (and plots) beside a results JSON/CSV file."""
    path = Path(path)
    rows = load_rows(path)
    stem = path.with_suffix("")
    md = stem.with_name(stem.name + ".md")
    md.write_text(render_markdown(rows))
    written = {"md": md}
    if plots:
        written["plots"] = write_plots(rows, stem)
    return written

"""Overlay the per-layer accuracy of several probe runs in one plot (as Fig. 7 of Zhang et al. ECCV16).

    crosschannel probe-compare runs/probe_color runs/probe_random runs/probe_supervised -o compare.png

Each RUN is a probe output folder (or its ``results.json``). Also prints, and writes next to the plot, a
Markdown table with one row per run and one column per tap. Published figures of the same benchmark
(``pretext/data/published.tsv``, default ``in1k_linear``: ImageNet-1k linear probes) are drawn as dashed
reference lines and listed under the table.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from pretext.runtime import UserError, atomic_write_text


def load_results(run: str | Path) -> dict:
    p = Path(run)
    p = p / "results.json" if p.is_dir() else p
    if not p.is_file():
        raise UserError(f"{run}: no results.json (is it a finished probe run?)")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{p}: invalid JSON ({e})") from None


def tap_order(runs: list[dict]) -> list[str]:
    """Union of the runs' taps, first-seen order (all runs of one architecture share the same order)."""
    order: list[str] = []
    for r in runs:
        for t in r["taps"]:
            if t["tap"] not in order:
                order.append(t["tap"])
    return order


PROBE_BENCHMARK = "in1k_linear"


def reference_rows(benchmark: str | None = PROBE_BENCHMARK) -> list[dict]:
    """Published rows of ``benchmark`` (none for ``None``)."""
    if not benchmark:
        return []
    from pretext.published import published

    return published(benchmark)


def reference_table(num_classes: int | None = None, benchmark: str | None = PROBE_BENCHMARK) -> str:
    """Markdown list of the published figures set beside a probe run (with a caveat when the data differ)."""
    if not benchmark:
        return ""
    rows = reference_rows(benchmark)
    out = [f"Published figures (pretext/data/published.tsv, benchmark `{benchmark}`):", ""]
    if not rows:
        return "\n".join(out + ["none in the table (see PROVENANCE.md for the figures that could not be verified)."])
    if benchmark == PROBE_BENCHMARK and num_classes not in (None, 1000):
        out += [f"These are ImageNet-1k figures; this run has {num_classes} classes, so they only give a scale.", ""]
    out += ["| method | setting | metric | value | source |", "|---|---|---|---|---|"]
    out += [f"| {r['method']} | {r['setting']} | {r['metric']} | {r['value']:.2f} | {r['source']} |" for r in rows]
    return "\n".join(out)


def pooling_label(p: dict) -> str:
    """'avg k6/s6 ceil', 'bilinear 10x10', ... from a :meth:`~linear_probe.heads.PoolSpec.describe` dict."""
    if p["mode"] in ("avg", "fixed"):
        if p["kernel"] <= 1 and p["stride"] <= 1:
            return "none (as it is)"
        return f"{p['mode']} k{p['kernel']}/s{p['stride']}{' ceil' if p.get('ceil_mode') else ''}"
    return f"{p['mode']} {p['out'][1]}x{p['out'][2]}"


def _draw_references(ax, order: list[str], rows: list[dict], metric: str) -> None:
    """Dashed lines: per-tap published figures at their taps; a figure for no known tap spans the plot."""
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        if r["metric"] == metric:
            by_method.setdefault(r["method"], []).append(r)
    for method, rs in by_method.items():
        at_taps = [(order.index(r["setting"]), r["value"]) for r in rs if r["setting"] in order]
        if at_taps:
            at_taps.sort()
            ax.plot(*zip(*at_taps), linestyle="--", marker="x", color="0.4", label=f"published: {method}")
        for r in rs:
            if r["setting"] not in order:
                ax.axhline(r["value"], linestyle="--", color="0.55", linewidth=1,
                           label=f"published: {method}, {r['setting']}")


def plot_runs(runs: list[dict], path: str | Path, metric: str = "top1", title: str | None = None,
              labels: list[str] | None = None, references: list[dict] | None = None) -> Path:
    """One line per run: ``metric`` (top1 | top5, %) against the layer; taps missing from a run are skipped.
    ``references``: published rows (see :func:`reference_rows`) drawn as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = tap_order(runs)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(order) + 2), 3.6))
    for i, r in enumerate(runs):
        acc = {t["tap"]: t[metric] for t in r["taps"]}
        xs = [j for j, t in enumerate(order) if t in acc]
        ax.plot(xs, [acc[order[j]] for j in xs], marker="o", label=(labels[i] if labels else r.get("label", f"run {i}")))
    _draw_references(ax, order, references or [], metric)
    ax.set_xticks(range(len(order)), order)
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{'top-1' if metric == 'top1' else 'top-5'} accuracy (%)")
    if len(runs) == 1:
        r = runs[0]
        ax.set_title(title or f"{r.get('label', '')}: {r.get('num_classes', '?')} classes, {r.get('num_val', '?')} val images",
                     fontsize=9)
    elif title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def markdown_table(runs: list[dict], metric: str = "top1", labels: list[str] | None = None) -> str:
    order = tap_order(runs)
    lines = [f"| run ({metric}) | " + " | ".join(order) + " |", "|---|" + "---|" * len(order)]
    for i, r in enumerate(runs):
        acc = {t["tap"]: t[metric] for t in r["taps"]}
        cells = [f"{acc[t]:.2f}" if t in acc else "" for t in order]
        lines.append(f"| {labels[i] if labels else r.get('label', f'run {i}')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("linear_probe.compare", description="Overlay per-layer accuracy of probe runs.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="probe output folders (or results.json files)")
    p.add_argument("-o", "--output", default="probe_compare.png", help="PNG to write (a .md table goes next to it)")
    p.add_argument("--metric", choices=("top1", "top5"), default="top1")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run (default: the runs' labels)")
    p.add_argument("--title", default=None)
    p.add_argument("--reference", default=PROBE_BENCHMARK, metavar="BENCHMARK",
                   help=f"published figures to draw as dashed lines (default {PROBE_BENCHMARK}; 'none' for none)")
    return p


def main(args) -> int:
    runs = [load_results(r) for r in args.runs]
    if args.labels and len(args.labels) != len(runs):
        raise UserError(f"--labels: {len(args.labels)} labels for {len(runs)} runs")
    bench = None if args.reference in ("", "none") else args.reference
    out = plot_runs(runs, args.output, args.metric, args.title, args.labels, reference_rows(bench))
    ncls = {r.get("num_classes") for r in runs}
    table = markdown_table(runs, args.metric, args.labels) + "\n" + reference_table(
        ncls.pop() if len(ncls) == 1 else None, bench) + "\n"
    atomic_write_text(out.with_suffix(".md"), table)
    print(table, end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))

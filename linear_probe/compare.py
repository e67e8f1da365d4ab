"""Overlay the per-layer accuracy of several probe runs in one plot (as Fig. 7 of Zhang et al. ECCV16).

    crosschannel probe-compare runs/probe_color runs/probe_random runs/probe_supervised -o compare.png

Each RUN is a probe output folder (or its ``results.json``). Also prints, and writes next to the plot, a
Markdown table with one row per run and one column per tap.
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


def plot_runs(runs: list[dict], path: str | Path, metric: str = "top1", title: str | None = None,
              labels: list[str] | None = None) -> Path:
    """One line per run: ``metric`` (top1 | top5, %) against the layer; taps missing from a run are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = tap_order(runs)
    fig, ax = plt.subplots(figsize=(max(4.5, 0.8 * len(order) + 2), 3.6))
    for i, r in enumerate(runs):
        acc = {t["tap"]: t[metric] for t in r["taps"]}
        xs = [j for j, t in enumerate(order) if t in acc]
        ax.plot(xs, [acc[order[j]] for j in xs], marker="o", label=(labels[i] if labels else r.get("label", f"run {i}")))
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
    return p


def main(args) -> int:
    runs = [load_results(r) for r in args.runs]
    if args.labels and len(args.labels) != len(runs):
        raise UserError(f"--labels: {len(args.labels)} labels for {len(runs)} runs")
    out = plot_runs(runs, args.output, args.metric, args.title, args.labels)
    table = markdown_table(runs, args.metric, args.labels)
    atomic_write_text(out.with_suffix(".md"), table)
    print(table, end="")
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    import sys

    from pretext.runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))

"""Analyse a colorization Turing test: ``crosschannel turing-report DB [-o DIR]``.

Zhang et al. 2016, Table 1 "AMT Labeled Real (%)": for each algorithm, the share of test pairs in which the
participant called the real photo fake, i.e. took the algorithm's colours for real (50% would be a perfect
colorization), with its bootstrap standard error; and Fig. 6: the photos sorted by how often their colorization fooled
people. Practice pairs are left out (as in the paper) and so are the sentinel pairs (the photo against another photo's
colours), which measure attention instead: a participant whose sentinel accuracy is below ``--min-sentinel-accuracy``
is left out, and the report names them. Only complete sessions count unless ``--include-incomplete``.

The standard error resamples participants with replacement (``--bootstrap`` times, seeded): a participant's answers
are not independent of each other, so resampling single trials would understate it. The paper says "bootstrap" without
naming the unit (PROVENANCE.md "Turing test").

Writes ``report.md`` (the table, who was left out and why), ``report.json`` (every number, per participant and per
photo), ``labeled_real.png`` (Table 1 as bars) and ``fig6_<algorithm>.png`` (photos sorted by fooling rate, with the
most and least convincing colorizations when the folders are still there).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from .runtime import UserError, atomic_write_text
from .turing_store import connect


# --------------------------------------------------------------------------------------------- reading
def load(db: str | Path) -> tuple[list[dict], list[dict]]:
    """All sessions and trials of a turing-test database (opened read-only: the server may still be running)."""
    conn = connect(db, readonly=True)
    try:
        sessions = [dict(r) for r in conn.execute("SELECT * FROM sessions ORDER BY created_at, id")]
        trials = [dict(r) for r in conn.execute("SELECT * FROM trials ORDER BY session_id, idx")]
    finally:
        conn.close()
    return sessions, trials


# --------------------------------------------------------------------------------------------- statistics
def pooled_rate(fooled: np.ndarray, shown: np.ndarray) -> float:
    """Share of pairs that fooled, pooled over participants (``fooled``, ``shown``: counts per participant)."""
    return float(fooled.sum() / shown.sum()) if shown.sum() else float("nan")


def bootstrap_se(fooled, shown, n_boot: int = 1000, seed: int = 0) -> float:
    """Bootstrap standard error of :func:`pooled_rate`, resampling participants with replacement."""
    fooled, shown = np.asarray(fooled, dtype=np.float64), np.asarray(shown, dtype=np.float64)
    n = len(shown)
    if n == 0 or n_boot < 2:
        return float("nan")
    idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
    f, s = fooled[idx].sum(1), shown[idx].sum(1)
    rates = np.divide(f, s, out=np.full(n_boot, np.nan), where=s > 0)
    return float(np.nanstd(rates, ddof=1))


def _pct(x: float | None) -> float | None:
    return None if x is None or x != x else round(100.0 * x, 2)


def summarize(sessions: list[dict], trials: list[dict], min_sentinel_accuracy: float = 0.75,
              include_incomplete: bool = False, n_boot: int = 1000, seed: int = 0) -> dict:
    """Every number of the report (see the module docstring); percentages in 0..100."""
    by_session: dict[str, list[dict]] = {}
    for t in trials:
        by_session.setdefault(t["session_id"], []).append(t)
    participants = []
    for s in sessions:
        ts = by_session.get(s["id"], [])
        answered = [t for t in ts if t["choice"] is not None]
        test = [t for t in answered if t["phase"] == "test"]
        alg = [t for t in test if t["kind"] == "algorithm"]
        sen = [t for t in test if t["kind"] == "sentinel"]
        sen_ok = sum(1 - t["fooled"] for t in sen)
        complete = s["finished_at"] is not None
        acc = sen_ok / len(sen) if sen else None
        counted = complete or include_incomplete
        passed = acc is None or acc >= min_sentinel_accuracy
        participants.append({
            "participant": s["participant"], "session": s["id"], "algorithm": s["algorithm"], "complete": complete,
            "answered": len(answered), "trials": len(ts), "test_pairs": len(alg), "fooled": sum(t["fooled"] for t in alg),
            "sentinel_total": len(sen), "sentinel_correct": sen_ok, "sentinel_accuracy": _pct(acc),
            "kept": counted and passed, "left_out": None if not counted else (None if passed else "sentinels"),
            "minutes": round((s["finished_at"] - s["created_at"]) / 60.0, 2) if complete else None,
            "_pairs": alg,
        })
    algorithms = {}
    for name in sorted({s["algorithm"] for s in sessions}):
        ps = [p for p in participants if p["algorithm"] == name]
        counted = [p for p in ps if p["complete"] or include_incomplete]
        kept = [p for p in counted if p["kept"]]
        fooled = np.array([p["fooled"] for p in kept]), np.array([p["test_pairs"] for p in kept])
        rate = pooled_rate(*fooled) if kept else float("nan")
        images: dict[str, list[int]] = {}
        for p in kept:
            for t in p["_pairs"]:
                images.setdefault(t["image"], [0, 0])
                images[t["image"]][0] += t["fooled"]
                images[t["image"]][1] += 1
        per_image = sorted(({"image": k, "fooled": f, "shown": n, "rate": _pct(f / n)} for k, (f, n) in images.items()),
                           key=lambda d: (-d["rate"], -d["shown"], d["image"]))
        sen_total = sum(p["sentinel_total"] for p in counted)
        sen_ok = sum(p["sentinel_correct"] for p in counted)
        rts = [t["rt_ms"] for p in kept for t in p["_pairs"]]
        algorithms[name] = {
            "sessions": len(ps), "counted": len(counted), "kept": len(kept),
            "incomplete": sum(not p["complete"] for p in ps),
            "left_out": [p["participant"] for p in counted if not p["kept"]],
            "test_pairs": int(fooled[1].sum()), "fooled": int(fooled[0].sum()),
            "labeled_real": _pct(rate), "se": _pct(bootstrap_se(*fooled, n_boot=n_boot, seed=seed)) if kept else None,
            "sentinel_pairs": sen_total, "sentinel_correct": sen_ok,
            "sentinel_accuracy": _pct(sen_ok / sen_total) if sen_total else None,
            "median_rt_ms": float(np.median(rts)) if rts else None,
            "reshown_pairs": sum(t["views"] > 1 for p in kept for t in p["_pairs"]),
            "images": per_image,
        }
    counted = [p for p in participants if p["complete"] or include_incomplete]
    sen_total = sum(p["sentinel_total"] for p in counted)
    minutes = [p["minutes"] for p in participants if p["minutes"] is not None]
    for p in participants:
        del p["_pairs"]
    return {
        "settings": {"min_sentinel_accuracy": min_sentinel_accuracy, "include_incomplete": include_incomplete,
                     "bootstrap": n_boot, "seed": seed},
        "sentinel_accuracy": _pct(sum(p["sentinel_correct"] for p in counted) / sen_total) if sen_total else None,
        "median_session_minutes": float(np.median(minutes)) if minutes else None,
        "algorithms": algorithms, "participants": participants,
    }


# --------------------------------------------------------------------------------------------- writing
def _fmt(x, nd: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{nd}f}"


def markdown(r: dict, db: str = "") -> str:
    st = r["settings"]
    lines = [f"# Colorization Turing test{': ' + db if db else ''}", "",
             "| Method | Labeled Real (%) | Participants kept | Test pairs | Sentinels correct (%) |", "|---|---|---|---|---|"]
    for name, a in r["algorithms"].items():
        real = "n/a" if a["labeled_real"] is None else f"{a['labeled_real']:.1f} ± {a['se']:.1f}"
        lines.append(f"| {name} | {real} | {a['kept']} of {a['counted']} | {a['test_pairs']} | {_fmt(a['sentinel_accuracy'])} |")
    lines += ["", "Labeled Real: the share of test pairs in which the participant called the real photo fake, i.e. took "
              "the algorithm's colours for real (Zhang et al. 2016, Table 1; a perfect colorization scores 50%). "
              f"±: bootstrap standard error over participants ({st['bootstrap']} resamples, seed {st['seed']}). "
              "Practice and sentinel pairs are not counted."]
    left = [p for p in r["participants"] if p["left_out"]]
    if left:
        lines += ["", f"Left out for failing the sentinels (accuracy below {100 * st['min_sentinel_accuracy']:.0f}%): "
                  + ", ".join(f"{p['participant']} ({p['algorithm']}, {p['sentinel_correct']} of {p['sentinel_total']})"
                              for p in left) + "."]
    else:
        lines += ["", f"No participant failed the sentinels (threshold {100 * st['min_sentinel_accuracy']:.0f}%)."]
    inc = [p for p in r["participants"] if not p["complete"]]
    if inc:
        verb = "counted" if st["include_incomplete"] else "not counted"
        lines += ["", f"Incomplete sessions, {verb}: " + ", ".join(
            f"{p['participant']} ({p['answered']} of {p['trials']} answered)" for p in inc) + "."]
    lines += ["", f"Sentinel accuracy over the counted sessions: {_fmt(r['sentinel_accuracy'])}% (Zhang et al. report 87%)."]
    if r["median_session_minutes"] is not None:
        lines.append(f"Median length of a complete session: {r['median_session_minutes']:.1f} min.")
    reshown = sum(a["reshown_pairs"] for a in r["algorithms"].values())
    if reshown:
        lines.append(f"Test pairs shown more than once (the participant reloaded the page): {reshown}, counted.")
    for name, a in r["algorithms"].items():
        if not a["images"]:
            continue
        lines += ["", f"## {name}: photos by how often they fooled (Fig. 6)", "", f"![{name}]({fig6_name(name)})", "",
                  "| photo | fooled | shown | Labeled Real (%) |", "|---|---|---|---|"]
        lines += [f"| {d['image']} | {d['fooled']} | {d['shown']} | {d['rate']:.0f} |" for d in a["images"]]
    return "\n".join(lines) + "\n"


def fig6_name(algorithm: str) -> str:
    return f"fig6_{re.sub(r'[^A-Za-z0-9_.+-]', '_', algorithm)}.png"


def plot_labeled_real(r: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, a in r["algorithms"].items() if a["labeled_real"] is not None]
    fig, ax = plt.subplots(figsize=(6, 1.2 + 0.45 * max(1, len(names))))
    y = np.arange(len(names))
    ax.barh(y, [r["algorithms"][n]["labeled_real"] for n in names], xerr=[r["algorithms"][n]["se"] for n in names],
            color="#4c72b0", capsize=4)
    ax.axvline(50, color="k", ls="--", lw=1)
    ax.text(50, 1.0, "ground truth", transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8)
    ax.set_yticks(y, names)
    ax.invert_yaxis()
    ax.set_xlim(0, 60)
    ax.set_xlabel("Labeled Real (%)  ± bootstrap s.e.")
    ax.set_title("Colorization Turing test (Zhang et al. 2016, Table 1)", fontsize=10, pad=14)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _thumbnails(names: list[str], fake_dir: str | None, size: int = 96) -> dict:
    """Fake images of ``names`` as small squares, from the session's folder if it is still there."""
    from .data import UnreadableImage, read_image
    from .turing import index_folder, square

    if not fake_dir or not Path(fake_dir).is_dir():
        return {}
    try:
        files = index_folder(fake_dir)
    except UserError:
        return {}
    out = {}
    for n in names:
        if n in files:
            try:
                out[n] = square(read_image(files[n]), size)
            except UnreadableImage:
                pass
    return out


def plot_fig6(name: str, a: dict, fake_dir: str | None, path: Path, top: int = 6) -> None:
    """Photos sorted by how often the colorization fooled people (bars), and the ``top`` most and least convincing
    colorizations (the paper's Fig. 6) when the folder is readable."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs = a["images"]
    ends = imgs[:top] + [d for d in imgs[-top:] if d not in imgs[:top]]
    thumbs = _thumbnails([d["image"] for d in ends], fake_dir)
    n = max(1, len(ends))
    fig = plt.figure(figsize=(max(6.0, 0.9 * n), 4.4 if thumbs else 3.0))
    grid = fig.add_gridspec(2 if thumbs else 1, n, height_ratios=[2.4, 1] if thumbs else [1])
    ax = fig.add_subplot(grid[0, :])
    ax.bar(np.arange(len(imgs)), [d["rate"] for d in imgs], color="#4c72b0", width=0.85)
    ax.axhline(50, color="k", ls="--", lw=1)
    ax.set_ylim(0, 100)
    ax.set_xlim(-0.6, len(imgs) - 0.4)
    ax.set_xticks([])
    ax.set_xlabel(f"{len(imgs)} photos, sorted by how often the colorization fooled")
    ax.set_ylabel("Labeled Real (%)")
    ax.set_title(f"{name}: {_fmt(a['labeled_real'])}% ± {_fmt(a['se'])} over {a['test_pairs']} pairs "
                 "(Zhang et al. Fig. 6)", fontsize=10)
    for i, d in enumerate(ends if thumbs else []):
        tax = fig.add_subplot(grid[1, i])
        tax.axis("off")
        if d["image"] in thumbs:
            tax.imshow(np.asarray(thumbs[d["image"]]))
        tax.set_title(f"{d['rate']:.0f}% ({d['fooled']}/{d['shown']})", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(r: dict, sessions: list[dict], out: Path, db: str = "") -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "report.json", json.dumps(r, indent=1))
    atomic_write_text(out / "report.md", markdown(r, db))
    plot_labeled_real(r, out / "labeled_real.png")
    dirs = {s["algorithm"]: s["fake_dir"] for s in sessions}
    for name, a in r["algorithms"].items():
        if a["images"]:
            plot_fig6(name, a, dirs.get(name), out / fig6_name(name))


# --------------------------------------------------------------------------------------------- CLI
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("crosschannel turing-report", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("db", help="database written by 'crosschannel turing-test'")
    p.add_argument("-o", "--output", default=None, help="report folder (default: <db without suffix>_report)")
    p.add_argument("--min-sentinel-accuracy", type=float, default=0.75,
                   help="leave out participants whose sentinel accuracy is below this (0 keeps everyone)")
    p.add_argument("--include-incomplete", action="store_true", help="count the answers of unfinished sessions too")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of participants")
    p.add_argument("--seed", type=int, default=0, help="seed of the bootstrap")
    return p


def main(args) -> int:
    if not 0.0 <= args.min_sentinel_accuracy <= 1.0:
        raise UserError(f"--min-sentinel-accuracy must be in [0, 1] (got {args.min_sentinel_accuracy})")
    if not 2 <= args.bootstrap <= 1_000_000:
        raise UserError(f"--bootstrap must be 2..1000000 (got {args.bootstrap})")
    sessions, trials = load(args.db)
    if not sessions:
        raise UserError(f"{args.db}: no sessions yet")
    t0 = time.time()
    r = summarize(sessions, trials, args.min_sentinel_accuracy, args.include_incomplete, args.bootstrap, args.seed)
    out = Path(args.output) if args.output else Path(args.db).with_name(Path(args.db).stem + "_report")
    write_report(r, sessions, out, str(args.db))
    md = markdown(r, str(args.db))
    print(md[: md.find("\n## ")] if "\n## " in md else md)
    print(f"report -> {out}/report.md, report.json, labeled_real.png, fig6_*.png ({time.time() - t0:.1f} s)")
    return 0


if __name__ == "__main__":
    from .runtime import run_entry

    sys.exit(run_entry(main, get_args_parser()))

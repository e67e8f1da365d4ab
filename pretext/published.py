"""Published figures to set beside ours: one table shipped with the package (``data/published.tsv``).

Each row is one number from a paper or a released evaluation, with the protocol it was measured under and its
source. Reports (eval-color, probe, svm, transfer) look their rows up here and print them beside the measured
figures; they are never used as results.

Columns: ``benchmark`` (e.g. ``voc07_cls``), ``method`` (e.g. ``zhang_alexnet_cc``), ``setting`` (a free key within the
benchmark, e.g. ``fc6-8/gray``), ``metric`` (e.g. ``mAP``), ``value`` (a float), ``source`` (paper, table and page,
or the released file).
"""
from __future__ import annotations

import csv
from functools import lru_cache
from importlib import resources

COLUMNS = ("benchmark", "method", "setting", "metric", "value", "source")


@lru_cache(maxsize=1)
def _rows() -> tuple[dict, ...]:
    text = resources.files("pretext").joinpath("data/published.tsv").read_text()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    reader = csv.DictReader(lines, delimiter="\t")
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise ValueError(f"published.tsv: columns must be {COLUMNS}, got {reader.fieldnames}")
    out = []
    for i, r in enumerate(reader, start=2):
        try:
            r["value"] = float(r["value"])
        except (TypeError, ValueError):
            raise ValueError(f"published.tsv line {i}: value {r['value']!r} is not a number") from None
        out.append(r)
    return tuple(out)


def published(benchmark: str | None = None, **match: str) -> list[dict]:
    """Rows of the published table, filtered by ``benchmark`` and any other column (exact match)."""
    return [dict(r) for r in _rows()
            if (benchmark is None or r["benchmark"] == benchmark) and all(r.get(k) == v for k, v in match.items())]

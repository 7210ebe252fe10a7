"""The printed table: each figure beside its direct baseline, the difference, the target."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def _num(value: float | None, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if unit == "1/s" or abs(value) >= 1000:
        return f"{value:,.0f}"
    if unit in ("", "MiB") and float(value).is_integer():
        return f"{value:.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _diff(row: dict[str, Any]) -> str:
    diff = row["diff"]
    if diff is None or (isinstance(diff, float) and math.isnan(diff)):
        return "-"
    if row["ratio"]:
        return f"{100 * diff:.0f}%"
    if "paired" in row["metric"]:
        return f"p99 {_num(diff, row['unit'])}"
    return ("+" if diff >= 0 else "") + _num(diff, row["unit"])


def render(rows: Sequence[dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: r["section"].split(" ", 1)[0])  # stable: run order
    header = ("metric", "unit", "direct", "swapd", "diff", "target", "status", "others")
    body = [(r["metric"], r["unit"], _num(r["direct"], r["unit"]), _num(r["swapd"], r["unit"]),
             _diff(r), r["target"], r["status"],
             "" if r.get("others") is None else f"{r['others']:.2f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    right = {2, 3, 4, 7}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    out = [line(header), line(["-" * w for w in widths])]
    section = None
    for row, cells in zip(rows, body, strict=True):
        if row["section"] != section:
            section = row["section"]
            out.append(f"[{section}]")
        out.append(line(cells))
    out.append("diff: swapd - direct, or swapd as a % of direct for rates and counts.\n"
               "others: cores used by processes this run did not start, meanwhile "
               "(0 = a quiet machine).")
    return "\n".join(out)

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
    if row.get("times"):
        return f"{diff:.2f}x"
    if row["ratio"]:
        return f"{100 * diff:.0f}%"
    if "paired" in row["metric"]:
        return f"p99 {_num(diff, row['unit'])}"
    return ("+" if diff >= 0 else "") + _num(diff, row["unit"])


def render(rows: Sequence[dict[str, Any]]) -> str:
    rows = sorted(rows, key=lambda r: r["section"].split(" ", 1)[0])  # stable: run order
    # The floor relay and llama-swap columns (section 9) appear only when a row has them.
    extra = [(key, title) for key, title in (("floor", "floor"), ("peer", "llama-swap"))
             if any(r.get(key) is not None for r in rows)]
    header = ("metric", "unit", "direct", *(t for _, t in extra), "swapd", "diff", "target",
              "status", "others")
    body = [(r["metric"], r["unit"], _num(r["direct"], r["unit"]),
             *(_num(r.get(key), r["unit"]) for key, _ in extra), _num(r["swapd"], r["unit"]),
             _diff(r), r["target"], r["status"],
             "" if r.get("others") is None else f"{r['others']:.2f}") for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h)
              for i, h in enumerate(header)]
    right = {2, *range(3, 5 + len(extra)), len(header) - 1}

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
    out.append("diff: swapd - direct, or swapd as a % of direct for rates and counts, or "
               "swapd as a multiple of the floor relay (x).\n"
               "others: cores used by processes this run did not start, meanwhile "
               "(0 = a quiet machine).")
    return "\n".join(out)

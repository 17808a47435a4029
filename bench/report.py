"""Medians, ratios against each peer, targets, the printed table and the JSON
record. Ratios are ftpcluster ÷ peer for every workload (for memory, lower is
better, so a ratio below 1 is the good side)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from .workloads import Workload

US = "ftpcluster"


def median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def paired_ratio(ours: list[float], theirs: list[float]) -> float | None:
    """The median of run-by-run ratios when both have a sample from every run: a run
    measures every peer back to back, so a shared machine's drift between runs (a
    slow minute slows all peers of that run) cancels out of each ratio. None when the
    runs do not pair up (a peer failed a run): the caller takes the ratio of medians."""
    if len(ours) < 2 or len(ours) != len(theirs) or not all(theirs):
        return None
    return median([a / b for a, b in zip(ours, theirs)])


def summarize(w: Workload, samples: dict[str, list[float]], details: dict[str, list[dict[str, Any]]],
              errors: dict[str, str]) -> dict[str, Any]:  # fmt: skip
    values = {peer: median(xs) for peer, xs in samples.items()}
    ours = values.get(US)
    ratios: dict[str, float | None] = {}
    for peer, v in values.items():
        if peer != US:
            ratios[peer] = paired_ratio(samples.get(US, []), samples[peer]) or ((ours / v) if (ours is not None and v) else None)
    targets = []
    for peer, bound in w.targets:
        if peer == "absolute":
            met = None if ours is None else ours <= bound if not w.higher_is_better else ours >= bound
            text = f"{'<=' if not w.higher_is_better else '>='} {bound:g} {w.unit}"
        else:
            r = ratios.get(peer)
            met = None if r is None else r >= bound if w.higher_is_better else r <= bound
            text = f"{'>=' if w.higher_is_better else '<='} {bound:g}x {peer}"
        targets.append({"target": text, "met": met})
    return {
        "name": w.name, "title": w.title, "unit": w.unit, "higher_is_better": w.higher_is_better,
        "values": values, "samples": samples, "ratios": ratios, "targets": targets,
        "details": details, "errors": errors,
    }  # fmt: skip


def _fmt(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.1f}" if v >= 10 else f"{v:.2f}"


def table(rows: list[dict[str, Any]], peers: list[str]) -> str:
    others = [p for p in peers if p != US]
    head = ["workload", "unit", *peers, *(f"x {p}" for p in others), "target", "met"]
    body = []
    for r in rows:
        cells = [r["title"], r["unit"], *(_fmt(r["values"].get(p)) for p in peers)]
        cells += [("-" if r["ratios"].get(p) is None else f"{r['ratios'][p]:.2f}x") for p in others]
        tgt = "; ".join(t["target"] for t in r["targets"]) or "-"
        met = "; ".join({True: "yes", False: "NO", None: "?"}[t["met"]] for t in r["targets"]) or "-"
        body.append([*cells, tgt, met])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *body)]
    line = lambda cells: "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [line(head), "  ".join("-" * w for w in widths), *(line(b) for b in body)]
    return "\n".join(out)


def write_json(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2, default=str))
    tmp.replace(path)

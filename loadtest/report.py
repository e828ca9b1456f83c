"""The report: one table per scenario drawn from its JSON section, and the JSON file.

Tables are rendered from the very dicts that go into the JSON file, so
every figure a table shows is in the file under the same target.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

Row = tuple[str, list[str], list[str]]  # label, a value per target, a ratio per target


def fmt_s(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if x < 0.01:
        return f"{x * 1000:.2f} ms"
    return f"{x:.3f} s"


def fmt_num(x: float | None, digits: int = 1) -> str:
    if x is None:
        return "-"
    if isinstance(x, int):
        return str(x)
    return f"{x:,.{digits}f}"


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}x"


def grid(title: str, names: list[str], rows: list[Row], *, ratios: bool = True) -> str:
    """A text table: one column per target, and after each but the first its ratio to the first."""
    header = [""]
    for i, n in enumerate(names):
        header.append(n)
        if ratios and i:
            header.append(f"/{names[0]}")
    body = []
    for label, values, rs in rows:
        line = [label]
        for i, v in enumerate(values):
            line.append(v)
            if ratios and i:
                line.append(rs[i] if i < len(rs) else "")
        body.append(line)
    widths = [max(len(r[c]) for r in [header, *body]) for c in range(len(header))]
    out = [title]
    for r in [header, *body]:
        cells = "".join(c.rjust(w + 2) for c, w in zip(r[1:], widths[1:], strict=True))
        out.append((r[0].ljust(widths[0] + 2) + cells).rstrip())
    return "\n".join(out)


def _row(label: str, results: list[dict[str, Any]], value: Callable[[dict[str, Any]], str],
         ratio_key: str | None = None) -> Row:
    rs = [fmt_ratio(r.get("ratio_to_first", {}).get(ratio_key)) if ratio_key else "" for r in results]
    return label, [value(r) for r in results], rs


def sessions_table(section: dict[str, Any]) -> str:
    results = section["results"]
    names = [r["target"] for r in results]
    rows: list[Row] = [
        _row("attempts", results, lambda r: str(r["attempts"])),
        _row("succeeded", results, lambda r: str(r["succeeded"]), "succeeded"),
    ]
    for code in sorted({c for r in results for c in r["refused"]}):
        rows.append(_row(f"refused {code}", results, lambda r, c=code: str(r["refused"].get(c, 0))))
    for code in sorted({c for r in results for c in r["failed_first_query"]}):
        rows.append(_row(f"failed at first query {code}", results,
                         lambda r, c=code: str(r["failed_first_query"].get(c, 0))))
    for code in sorted({c for r in results for c in r["broken"]}):
        rows.append(_row(f"broken {code}", results, lambda r, c=code: str(r["broken"].get(c, 0))))
    for q in ("p50", "p95", "p99", "max"):
        rows.append(_row(f"connect wait {q}", results, lambda r, q=q: fmt_s(r["connect_wait_s"][q]),
                         f"connect_wait_{q}"))
    for q in ("p50", "p99"):
        rows.append(_row(f"first answer {q}", results, lambda r, q=q: fmt_s(r["first_answer_s"][q]),
                         f"first_answer_{q}"))
    for q in ("p50", "p99"):
        rows.append(_row(f"query latency {q}", results, lambda r, q=q: fmt_s(r["query_latency_s"][q]),
                         f"query_latency_{q}"))
    rows.append(_row("queries/s", results, lambda r: fmt_num(r["queries_per_s"]), "queries_per_s"))
    rows.append(_row("sessions/s", results, lambda r: fmt_num(r["sessions_per_s"]), "sessions_per_s"))
    rows.append(_row("wall time", results, lambda r: f"{r['wall_s']:.2f} s"))
    for key in sorted({k for r in results for k, v in r["extra"].items() if not isinstance(v, dict)}):
        rows.append(_row(key, results, lambda r, k=key: str(r["extra"].get(k, "-"))))
    text = grid(f"== {section['scenario']}: {section['description']}", names, rows)
    messages: dict[str, int] = {}
    for r in results:
        for m, n in r["messages"].items():
            messages[f"{r['target']}: {m}"] = n
    if any(r.get("kind") in ("pgbouncer", "pgbouncer-unpooled") for r in results):
        text += ("\nPgBouncer logs clients in itself: they wait for a server at their first query, "
                 "so compare 'first answer' (connect call to first result) there.")
    if messages:
        text += "\nWhat the clients that failed were told:\n" + "\n".join(
            f"  {n:5d} x {m}" for m, n in sorted(messages.items(), key=lambda kv: -kv[1]))
    return text


def render(section: dict[str, Any]) -> str:
    kind = section["kind"]
    if kind == "sessions":
        return sessions_table(section)
    from . import callgrind, measure, pgbench

    renderers = {"pgbench": pgbench.table, "relay": measure.relay_table,
                 "waiters": measure.waiters_table, "handoff": measure.handoff_table,
                 "instructions": callgrind.table}
    return renderers[kind](section)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=1, default=_jsonable, allow_nan=False) + "\n")


def _jsonable(x: Any) -> Any:
    if isinstance(x, float) and math.isnan(x):
        return None
    raise TypeError(f"not JSON: {type(x).__name__}")

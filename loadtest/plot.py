"""PNG timelines, one per scenario and target: sessions open, clients waiting, errors.

matplotlib is an optional extra (`pip install 'slotproxy[plot]'`); without it
the report says how to get it and everything else works as before.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

HOW_TO_GET = ("PNG timelines skipped: matplotlib is not installed "
              "(pip install 'slotproxy[plot]', or pip install matplotlib)")


def write(sections: list[dict[str, Any]], directory: Path, stem: str) -> tuple[list[Path], str]:
    """Write the PNGs; return (the files, "") or ([], why not)."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        return [], HOW_TO_GET
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for section in sections:
        if section["kind"] != "sessions":
            continue
        for result in section["results"]:
            path = directory / f"{stem}-{section['scenario']}-{_safe(result['target'])}.png"
            _one(plt, section, result, path)
            written.append(path)
    return written, ""


def _one(plt: Any, section: dict[str, Any], result: dict[str, Any], path: Path) -> None:
    tl = result["timeline"]
    fig, ax = plt.subplots(figsize=(9, 4), dpi=100)
    try:
        ax.step(tl["t"], tl["open"], where="post", label="sessions open", color="tab:blue")
        ax.step(tl["t"], tl["waiting"], where="post", label="clients waiting", color="tab:orange")
        ax.step(tl["t"], tl["errors"], where="post", label="errors so far", color="tab:red")
        for t, what in result.get("marks", []):
            ax.axvline(t, color="grey", linestyle=":", linewidth=1)
            ax.annotate(what, (t, 1), xycoords=("data", "axes fraction"), rotation=90, va="top",
                        ha="right", fontsize=7, color="grey")
        refused = ", ".join(f"{n} x {c}" for c, n in result["refused"].items()) or "none"
        first = sum(result["failed_first_query"].values())
        broken = sum(result["broken"].values())
        ax.set_title(f"{section['scenario']} through {result['target']}: {result['succeeded']} of "
                     f"{result['attempts']} succeeded; refused: {refused}; failed at first query: "
                     f"{first}; broken: {broken}", fontsize=10)
        ax.set_xlabel("seconds")
        ax.set_ylabel("clients")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        ax.legend(loc="upper right", fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)

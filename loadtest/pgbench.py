"""pgbench -S against each target in interleaved rounds (A B C A B C ...), so that machine drift cancels.

For each protocol (-M) and with or without a new connection per transaction
(-C). A target's ratio is the median of its per-round ratios to the first
target in the same round. Where the target's process is known, its CPU time
per transaction is measured from /proc. So is the whole machine's (everything
that ran meanwhile: pgbench, the server, the proxy, and whatever else), which
tells how far a proxy can move the ratio on a machine whose cores are all busy.
"""

from __future__ import annotations

import re
import time
from itertools import combinations
from typing import Any

from . import stats
from .context import Context
from .procs import cpu_seconds, machine_cpu_seconds, run_captured
from .report import Row, fmt_num, fmt_ratio, grid
from .spawn import pgbench_path
from .targets import Target

FIGURES = {
    "tps": re.compile(r"^tps = ([\d.]+)", re.M),
    "latency_ms": re.compile(r"^latency average = ([\d.]+) ms", re.M),
    "transactions": re.compile(r"^number of transactions actually processed: (\d+)", re.M),
    "failed": re.compile(r"^number of failed transactions: (\d+)", re.M),
}


def variant_name(protocol: str, reconnect: bool) -> str:
    return protocol + (" -C" if reconnect else "")


async def one_run(ctx: Context, target: Target, protocol: str, reconnect: bool) -> dict[str, Any]:
    k = ctx.knobs
    argv = [pgbench_path(), "-n", "-S", "-c", str(k.pgbench_clients), "-j", str(k.pgbench_jobs),
            "-T", str(k.pgbench_seconds), "-M", protocol, *(["-C"] if reconnect else []), target.dsn]
    cpu0 = cpu_seconds(target.pid) if target.pid else None
    machine0 = machine_cpu_seconds()
    started = time.perf_counter()
    status, out, err = await run_captured(argv, k.pgbench_seconds + 120, merge=False)
    wall = time.perf_counter() - started
    cpu1 = cpu_seconds(target.pid) if target.pid else None
    machine1 = machine_cpu_seconds()
    text = out.decode(errors="replace")
    run: dict[str, Any] = {"exit": status, "wall_s": round(wall, 3)}
    for key, pattern in FIGURES.items():
        m = pattern.search(text)
        run[key] = (float(m.group(1)) if "." in m.group(1) else int(m.group(1))) if m else None
    if cpu0 is not None and cpu1 is not None and run["transactions"]:
        run["proxy_cpu_us_per_tx"] = (cpu1 - cpu0) * 1e6 / run["transactions"]
    if machine0 is not None and machine1 is not None and run["transactions"]:
        user, kernel = machine1[0] - machine0[0], machine1[1] - machine0[1]
        run["machine_cpu_us_per_tx"] = (user + kernel) * 1e6 / run["transactions"]
        run["machine_kernel_share"] = kernel / (user + kernel) if user + kernel else None
    if status != 0 or run["tps"] is None:
        run["error"] = (err.decode(errors="replace").strip() or text.strip())[-600:]
    return run


async def run(ctx: Context) -> dict[str, Any]:
    k = ctx.knobs
    if ctx.env is not None:
        await ctx.env.prepare_pgbench(k.pgbench_scale)
    elif k.pgbench_init:
        status, out, _ = await run_captured(
            [pgbench_path(), "-i", "-q", "-s", str(k.pgbench_scale), ctx.targets[0].dsn])
        if status != 0:
            raise RuntimeError(f"pgbench -i failed:\n{out.decode(errors='replace')}")
    variants = [(p, c) for c in k.reconnect for p in k.protocols]
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {
        variant_name(p, c): {t.name: [] for t in ctx.targets} for p, c in variants}
    now = {"what": "starting", "since": time.perf_counter()}

    def status() -> str:
        return f"pgbench {now['what']}: {time.perf_counter() - now['since']:4.0f} s"

    order: list[str] = []  # "ROUND VARIANT TARGET", as they ran
    with ctx.progress.showing(status):
        for r in range(k.rounds):
            for protocol, reconnect in variants:
                for target in ctx.targets:
                    name = variant_name(protocol, reconnect)
                    now.update(what=f"round {r + 1}/{k.rounds} {name} {target.name}",
                               since=time.perf_counter())
                    order.append(f"{r + 1} {name} {target.name}")
                    runs[name][target.name].append(await one_run(ctx, target, protocol, reconnect))
                    await ctx.settle()
    names = [t.name for t in ctx.targets]
    results = {variant: _summarize(by_target, names) for variant, by_target in runs.items()}
    return {
        "scenario": "pgbench", "kind": "pgbench",
        "description": f"pgbench -S -c {k.pgbench_clients} -j {k.pgbench_jobs}, {k.pgbench_seconds} s per "
                       f"run, {k.rounds} rounds interleaved; median TPS, ratio = median of per-round ratios",
        "params": {"clients": k.pgbench_clients, "jobs": k.pgbench_jobs, "seconds": k.pgbench_seconds,
                   "rounds": k.rounds, "scale": k.pgbench_scale, "protocols": k.protocols,
                   "reconnect": k.reconnect},
        "targets": names,
        "order": order,
        "variants": results,
        "failed_runs": sum(len(res[n]["errors"]) for res in results.values() for n in names),
    }


def _summarize(by_target: dict[str, list[dict[str, Any]]], names: list[str]) -> dict[str, Any]:
    def ratio(key: str, x: str, y: str) -> float | None:
        """The median over the rounds of target x's figure `key` over target y's in the same round."""
        ratios = [stats.ratio(by_target[x][i].get(key), by_target[y][i].get(key)) for i in range(rounds)]
        return stats.median([r for r in ratios if r is not None])

    def median(runs: list[dict[str, Any]], key: str) -> float | None:
        return stats.median([r[key] for r in runs if r.get(key) is not None])

    rounds = len(by_target[names[0]])
    out: dict[str, Any] = {}
    for name in names:
        runs = by_target[name]
        out[name] = {
            "tps_median": median(runs, "tps"),
            "latency_ms_median": stats.median([r["latency_ms"] for r in runs if r.get("latency_ms")]),
            "proxy_cpu_us_per_tx_median": median(runs, "proxy_cpu_us_per_tx"),
            "machine_cpu_us_per_tx_median": median(runs, "machine_cpu_us_per_tx"),
            "machine_ratio_to_first": ratio("machine_cpu_us_per_tx", name, names[0]),
            "machine_kernel_share_median": median(runs, "machine_kernel_share"),
            "failed": sum(r.get("failed") or 0 for r in runs),
            "errors": [r["error"] for r in runs if "error" in r],
            "ratio_to_first": ratio("tps", name, names[0]),
            "runs": runs,
        }
    # Every pair, so that any comparison (slotproxy / pgbouncer) is at hand, each from its own rounds.
    pairs = {}
    for a, b in combinations(names, 2):
        for x, y in ((a, b), (b, a)):
            pairs[f"{x}/{y}"] = ratio("tps", x, y)
    out["_pairs"] = pairs
    return out


def table(section: dict[str, Any]) -> str:
    names = section["targets"]
    rows: list[Row] = []
    for variant, res in section["variants"].items():
        rows.append((f"tps {variant}", [fmt_num(res[n]["tps_median"], 0) for n in names],
                     [fmt_ratio(res[n]["ratio_to_first"]) for n in names]))
    for variant, res in section["variants"].items():
        rows.append((f"latency ms {variant}", [fmt_num(res[n]["latency_ms_median"], 3) for n in names],
                     ["" for _ in names]))
    for variant, res in section["variants"].items():
        if any(res[n]["proxy_cpu_us_per_tx_median"] is not None for n in names):
            rows.append((f"proxy CPU us/tx {variant}",
                         [fmt_num(res[n]["proxy_cpu_us_per_tx_median"]) for n in names],
                         ["" for _ in names]))
    for variant, res in section["variants"].items():
        if any(res[n]["machine_cpu_us_per_tx_median"] is not None for n in names):
            rows.append((f"machine CPU us/tx {variant}",
                         [fmt_num(res[n]["machine_cpu_us_per_tx_median"]) for n in names],
                         [fmt_ratio(res[n]["machine_ratio_to_first"]) for n in names]))
            rows.append((f"  of it in the kernel {variant}",
                         [_share(res[n]["machine_kernel_share_median"]) for n in names],
                         ["" for _ in names]))
    failed = [sum(res[n]["failed"] + len(res[n]["errors"]) for res in section["variants"].values())
              for n in names]
    rows.append(("failed transactions + runs", [str(f) for f in failed], ["" for _ in names]))
    text = grid(f"== pgbench: {section['description']}", names, rows)
    errors = {f"{n} {v}": res[n]["errors"][0] for v, res in section["variants"].items()
              for n in names if res[n]["errors"]}
    if errors:
        text += "\nRuns that failed:\n" + "\n".join(f"  {w}: {_gist(e)}" for w, e in errors.items())
    return text


def _gist(error: str) -> str:
    """pgbench's first error line and its first hint; else the last line of what it said."""
    lines = [line.strip() for line in error.splitlines() if line.strip()]
    said = [next((line for line in lines if line.startswith(prefix)), "")
            for prefix in ("pgbench: error:", "pgbench: hint:")]
    return " ".join(filter(None, said)) or (lines[-1] if lines else "(nothing said)")


def _share(share: float | None) -> str:
    return "-" if share is None else f"{share:.0%}"

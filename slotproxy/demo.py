"""`slotproxy demo`: one burst of clients against a throwaway server, without and with the proxy."""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from dataclasses import dataclass

import asyncpg

from . import config
from .cluster import Template
from .server import Proxy

APP_ROLE = "app"


@dataclass(frozen=True, slots=True)
class Outcome:
    ok: bool
    connect_wait: float
    sqlstate: str | None = None
    message: str | None = None


async def one_client(host: str, port: int, user: str, database: str, hold: float,
                     timeout: float = 60.0) -> Outcome:
    """Connect, run a query that holds the session for `hold` seconds, close."""
    started = time.perf_counter()
    try:
        conn = await asyncpg.connect(host=host, port=port, user=user, database=database,
                                     timeout=timeout, ssl=False)
    except asyncpg.PostgresError as e:
        return Outcome(False, time.perf_counter() - started, e.sqlstate, str(e))
    except (OSError, TimeoutError) as e:
        return Outcome(False, time.perf_counter() - started, None, f"{type(e).__name__}: {e}")
    waited = time.perf_counter() - started
    try:
        await conn.execute("select pg_sleep($1)", hold)
    except asyncpg.PostgresError as e:
        return Outcome(False, waited, e.sqlstate, str(e))
    finally:
        await conn.close()
    return Outcome(True, waited)


async def burst(host: str, port: int, clients: int, hold: float, user: str = APP_ROLE,
                database: str = "postgres") -> tuple[list[Outcome], float]:
    started = time.perf_counter()
    outcomes = await asyncio.gather(*(one_client(host, port, user, database, hold)
                                      for _ in range(clients)))
    return list(outcomes), time.perf_counter() - started


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def _table(runs: dict[str, tuple[list[Outcome], float]]) -> str:
    names = list(runs)
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, values: list[str]) -> None:
        rows.append((label, values))

    row("clients", [str(len(runs[n][0])) for n in names])
    row("succeeded", [str(sum(o.ok for o in runs[n][0])) for n in names])
    states = sorted({o.sqlstate or "no SQLSTATE" for n in names for o in runs[n][0] if not o.ok})
    for state in states:
        row(f"failed {state}", [str(sum(1 for o in runs[n][0] if not o.ok
                                        and (o.sqlstate or "no SQLSTATE") == state)) for n in names])
    for q in (50, 95, 99, 100):
        label = "connect wait max" if q == 100 else f"connect wait p{q}"
        row(label, [f"{percentile([o.connect_wait for o in runs[n][0] if o.ok], q):.3f} s"
                    for n in names])
    row("wall time", [f"{runs[n][1]:.2f} s" for n in names])
    width = max(len(label) for label, _ in rows) + 2
    cols = [max(len(n), *(len(v[i]) for _, v in rows)) + 2 for i, n in enumerate(names)]
    lines = [" " * width + "".join(n.rjust(c) for n, c in zip(names, cols, strict=True))]
    lines += [label.ljust(width) + "".join(v.rjust(c) for v, c in zip(values, cols, strict=True))
              for label, values in rows]
    return "\n".join(lines)


async def run_demo(clients: int = 100, max_connections: int = 10, hold: float = 0.5) -> int:
    reserved = min(3, max_connections - 2)
    slots = max_connections - reserved
    loop = asyncio.get_running_loop()
    print(f"Starting a throwaway PostgreSQL: max_connections={max_connections}, "
          f"{reserved} of them reserved for superusers ...", flush=True)
    template = await loop.run_in_executor(None, Template)
    cluster = template.cluster(max_connections=max_connections,
                               superuser_reserved_connections=reserved)
    try:
        await loop.run_in_executor(None, cluster.start)
        await loop.run_in_executor(None, cluster.psql, f"create role {APP_ROLE} login")
        cfg = config.from_mapping({
            "proxy": {"listen": "127.0.0.1:0"},
            "backend": {"host": cluster.host, "port": cluster.port},
            "admission": {"max_backend_slots": slots, "queue_timeout": 60},
        }, "demo")
        proxy = Proxy(cfg)
        await proxy.start()
        try:
            where = proxy.addresses[0]
            print(f"{clients} clients arrive at once; each holds a session for {hold:g} s.\n")
            print(f"1. straight at the server ({cluster.host}:{cluster.port}) ...", flush=True)
            direct = await burst(cluster.host, cluster.port, clients, hold)
            print(f"2. through slotproxy ({where}, admission.max_backend_slots={slots}) ...\n",
                  flush=True)
            proxied = await burst(where.host, where.port, clients, hold)
        finally:
            await proxy.shutdown()
        print(_table({"direct": direct, "slotproxy": proxied}))
        messages = Counter(f"{o.sqlstate}: {o.message}" for o in direct[0] + proxied[0] if not o.ok)
        if messages:
            print("\nWhat refused clients were told:")
            for text, count in messages.most_common():
                print(f"  {count:4d} x {text}")
        return 0 if all(o.ok for o in proxied[0]) else 1
    finally:
        await loop.run_in_executor(None, cluster.remove)
        template.remove()

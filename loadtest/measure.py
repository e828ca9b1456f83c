"""The measurements: relay throughput, memory per waiting client, and the slot handoff time.

relay    a large COPY result through each target, interleaved rounds; MiB/s and ratio to the first.
waiters  every slot of a proxy held, then N clients left waiting; the proxy's resident memory
         (VmRSS) before and with them, per waiting client. Needs the proxy's pid (spawned, or --pid).
handoff  the time from a slot freeing to the next waiter's first forwarded byte, measured from
         outside with a fake backend the harness plays itself (see `handoff`).
"""

from __future__ import annotations

import asyncio
import re
import shutil
import time
from collections.abc import Callable
from typing import Any

import asyncpg

from slotproxy.cluster import free_port

from . import stats
from .context import Context
from .procs import (
    PgBouncerProcess,
    SlotproxyProcess,
    cpu_seconds,
    pgbouncer_binary,
    raise_fd_limit,
    rss_bytes,
    run_captured,
    scratch_dir,
    unread_sockets,
    wait_for,
)
from .rawpg import FakeBackend, RawClient, open_client, startup_packet
from .report import Row, fmt_num, fmt_ratio, fmt_s, grid
from .spawn import APP_ROLE
from .targets import Target

MiB = 1 << 20

# -- relay ------------------------------------------------------------------------------------


async def relay(ctx: Context) -> dict[str, Any]:
    k = ctx.knobs
    # Binary COPY: the server sends its rows without escaping them, so the pipe is what is timed.
    sql = (f"copy (select repeat('x', {MiB - 1}) from generate_series(1, {k.relay_mb})) "
           "to stdout (format binary)")
    runs: dict[str, list[dict[str, Any]]] = {t.name: [] for t in ctx.targets}
    now = {"what": "starting"}
    with ctx.progress.showing(lambda: f"relay {now['what']}"):
        for r in range(k.rounds):
            for target in ctx.targets:
                now["what"] = f"round {r + 1}/{k.rounds} {target.name}"
                runs[target.name].append(await _relay_once(target, sql, k.relay_mb * MiB))
                await ctx.settle()
    names = [t.name for t in ctx.targets]
    results = []
    for name in names:
        per_round = [stats.ratio(a["mib_per_s"], b["mib_per_s"])
                     for a, b in zip(runs[name], runs[names[0]], strict=True)]
        cpu = [x["proxy_cpu_s"] for x in runs[name] if x.get("proxy_cpu_s") is not None]
        results.append({
            "target": name,
            "mib_per_s_median": stats.median([x["mib_per_s"] for x in runs[name]]),
            "seconds_median": stats.median([x["seconds"] for x in runs[name]]),
            "proxy_cpu_s_median": stats.median(cpu),
            "ratio_to_first": stats.median([x for x in per_round if x is not None]),
            "runs": runs[name],
        })
    return {"scenario": "relay", "kind": "relay",
            "description": f"a {k.relay_mb} MiB COPY result read by psql, {k.rounds} rounds interleaved; "
                           "median MiB/s, ratio = median of per-round ratios",
            "params": {"mib": k.relay_mb, "rounds": k.rounds, "sql": sql}, "results": results}


TIMING = re.compile(r"^Time: ([\d.]+) ms", re.M)


async def _relay_once(target: Target, sql: str, size: int) -> dict[str, Any]:
    """psql (C, all authentication methods) times the COPY itself: no connect time, no Python reader."""
    cpu0 = cpu_seconds(target.pid) if target.pid else None
    status, out, err = await run_captured(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", target.dsn, "-o", "/dev/null",
         "-c", "\\timing on", "-c", sql], 300, merge=False)
    cpu1 = cpu_seconds(target.pid) if target.pid else None
    m = TIMING.search(out.decode(errors="replace"))
    # With ON_ERROR_STOP, psql exits 0 only once the whole COPY result has come through.
    if status != 0 or not m:
        raise RuntimeError(f"relay through {target.name}: psql failed: {err.decode(errors='replace')[-400:]}")
    seconds = float(m.group(1)) / 1000
    return {"bytes": size, "seconds": seconds, "mib_per_s": size / MiB / seconds,
            "proxy_cpu_s": cpu1 - cpu0 if cpu0 is not None and cpu1 is not None else None}


def relay_table(section: dict[str, Any]) -> str:
    res = section["results"]
    rows: list[Row] = [
        ("MiB/s", [fmt_num(r["mib_per_s_median"]) for r in res],
         [fmt_ratio(r["ratio_to_first"]) for r in res]),
        ("seconds", [fmt_s(r["seconds_median"]) for r in res], ["" for _ in res]),
        ("proxy CPU s", [fmt_num(r["proxy_cpu_s_median"], 3) for r in res], ["" for _ in res]),
    ]
    return grid(f"== relay: {section['description']}", [r["target"] for r in res], rows)


# -- waiters ----------------------------------------------------------------------------------

BATCH = 500  # connections opened at once: well inside the proxy's listen backlog


async def waiters(ctx: Context) -> dict[str, Any]:
    fd_limit = raise_fd_limit()
    results = []
    for target in ctx.targets:
        if target.kind == "forwarder":
            results.append({"target": target.name, "skipped": "a bare forwarder has no queue: nobody waits"})
            continue
        if target.kind == "pgbouncer-unpooled":
            results.append({"target": target.name, "skipped": "the same queue as pgbouncer's"})
            continue
        if target.pid is None or target.name not in ctx.slots:
            results.append({"target": target.name,
                            "skipped": "its process and slots are unknown (--spawn, or --pid and --slots)"})
            continue
        results.append(await _waiters_one(ctx, target, ctx.slots[target.name], fd_limit))
        await ctx.settle()
    measured = [r for r in results if "skipped" not in r]
    for r in measured:
        r["ratio_to_first"] = stats.ratio(r["bytes_per_waiter"], measured[0]["bytes_per_waiter"])
    return {"scenario": "waiters", "kind": "waiters",
            "description": f"every slot held, then {ctx.knobs.waiters} clients waiting; the proxy's "
                           "resident memory (VmRSS); ratio to the first measured",
            "params": {"waiters": ctx.knobs.waiters, "fd_limit": fd_limit}, "results": results}


async def _waiters_one(ctx: Context, target: Target, slots: int, fd_limit: int) -> dict[str, Any]:
    assert target.pid is not None
    host, port = target.address
    want = min(ctx.knobs.waiters, fd_limit - slots - 200)  # our own sockets count against our limit
    if want < 1:
        raise RuntimeError(f"waiters: the open-file limit ({fd_limit}) leaves no room for waiting clients")
    answers_login = target.kind == "pgbouncer"  # PgBouncer logs clients in, then they wait for a server
    holders: list[asyncpg.Connection] = []
    clients: list[RawClient] = []
    startup = startup_packet(target.user, target.database, "loadtest-waiter")
    status = {"what": "holding every slot"}
    try:
        for _ in range(slots):
            holders.append(await asyncpg.connect(target.dsn, timeout=ctx.connect_timeout))
            await holders[-1].execute("select 1")
        rss_before = rss_bytes(target.pid)
        started = time.perf_counter()
        with ctx.progress.showing(lambda: f"waiters {target.name}: {status['what']}"):
            while len(clients) < want:
                batch = min(BATCH, want - len(clients))
                clients += await asyncio.gather(*(open_client(host, port, startup) for _ in range(batch)))
                status["what"] = f"{len(clients)} of {want} waiting"
                await wait_for(_all_read(port, slots, clients, answers_login),
                               f"{target.name} to read {len(clients)} waiting clients", 120, interval=0.05)
        queued = time.perf_counter() - started
        rss_with = rss_bytes(target.pid)
        closed = sum(c.closed for c in clients)
        answered = sum(1 for c in clients if c.first_byte_at is not None)
    finally:
        for c in clients:
            c.abort()
        for h in holders:
            h.terminate()
    await wait_for(lambda: unread_sockets(port)[0] == 0, f"{target.name} to close every client", 60,
                   interval=0.05)
    waiting = want - closed  # a client the proxy closed holds none of its memory
    per = (rss_with - rss_before) / waiting if rss_with is not None and rss_before is not None and waiting \
        else None
    return {"target": target.name, "waiting": waiting, "closed_by_proxy": closed,
            "answered_before_slot": answered, "rss_before_bytes": rss_before, "rss_with_bytes": rss_with,
            "bytes_per_waiter": per, "seconds_to_queue": queued}


def _all_read(port: int, slots: int, clients: list[RawClient], answers_login: bool) -> Callable[[], bool]:
    def check() -> bool:
        live = sum(not c.closed for c in clients)
        if answers_login and any(not c.query_sent for c in clients if not c.closed):
            return False
        established, unread = unread_sockets(port)
        return unread == 0 and established >= slots + live

    return check


def _mib(n: int | None) -> str:
    return "-" if n is None else f"{n / MiB:,.1f} MiB"


def waiters_table(section: dict[str, Any]) -> str:
    res = [r for r in section["results"] if "skipped" not in r]
    skipped = [f"{r['target']}: {r['skipped']}" for r in section["results"] if "skipped" in r]
    rows: list[Row] = [
        ("clients waiting", [str(r["waiting"]) for r in res], ["" for _ in res]),
        ("closed by the proxy", [str(r["closed_by_proxy"]) for r in res], ["" for _ in res]),
        ("RSS before", [_mib(r["rss_before_bytes"]) for r in res], ["" for _ in res]),
        ("RSS with them", [_mib(r["rss_with_bytes"]) for r in res], ["" for _ in res]),
        ("per waiting client", [fmt_num((r["bytes_per_waiter"] or 0) / 1024, 2) + " KiB" for r in res],
         [fmt_ratio(r.get("ratio_to_first")) for r in res]),
        ("time to queue them", [fmt_s(r["seconds_to_queue"]) for r in res], ["" for _ in res]),
    ]
    text = grid(f"== waiters: {section['description']}", [r["target"] for r in res], rows)
    return text + "".join(f"\n  skipped {s}" for s in skipped)


# -- handoff ----------------------------------------------------------------------------------

DEPTH = 8  # clients kept waiting behind the slot, each queued long before its turn


async def handoff(ctx: Context) -> dict[str, Any]:
    """The time from a slot freeing to the next waiter's first forwarded byte.

    The proxy runs with one server slot in front of a fake backend played by
    the harness. A holder has the slot and DEPTH clients wait behind it, every
    one of whose startup packets the proxy has read (no unread bytes on its
    sockets, from /proc/net/tcp). The slot frees when the backend closes the
    holder's server connection (t0); the figures are the time until:

      startup   the next waiter's startup packet has arrived at the backend
                (the first byte the proxy forwards for it), from t0;
      query     that waiter's first query has arrived at the backend;
      client    the waiter has received its first byte (slotproxy only: PgBouncer
                answers its clients' logins itself before they wait).

    For scale, `direct` is a client's own connect-to-startup time on the same machine.
    """
    kinds = ["slotproxy"]
    # PgBouncer too when it is among the targets (spawned).
    if pgbouncer_binary() and any(t.kind == "pgbouncer" for t in ctx.targets):
        kinds.append("pgbouncer")
    samples = ctx.knobs.handoffs
    results = [await _direct_floor(samples)]
    workdir = scratch_dir("loadtest-handoff-")
    now = {"what": "starting"}
    try:
        with ctx.progress.showing(lambda: f"handoff {now['what']}"):
            for kind in kinds:
                backend = FakeBackend()
                port = await backend.start()
                proxy: SlotproxyProcess | PgBouncerProcess | None = None
                try:
                    if kind == "slotproxy":
                        proxy = await SlotproxyProcess.start(workdir, ("127.0.0.1", port), slots=1,
                                                             max_queue=1000, queue_timeout=120,
                                                             name="slotproxy-handoff", cpus=ctx.proxy_cpus)
                    else:
                        proxy = await PgBouncerProcess.start(
                            workdir, ("127.0.0.1", port), free_port(), pool_size=1, users=[APP_ROLE],
                            max_clients=1000, query_wait_timeout=120, cpus=ctx.proxy_cpus)
                    results.append(await _handoff_one(kind, proxy.port, backend, samples, now))
                finally:
                    if proxy is not None:
                        await proxy.stop()
                    backend.close()
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    ref = results[1]["startup_s"]["p50"] if len(results) > 1 else None
    for r in results:
        r["ratio_to_first"] = stats.ratio(r["startup_s"]["p50"], ref)
    return {"scenario": "handoff", "kind": "handoff",
            "description": "slot frees (server closes the holder's session) -> next waiter's startup "
                           f"packet at the server; {samples} handoffs, {DEPTH} clients waiting",
            "params": {"samples": samples, "depth": DEPTH}, "results": results}


async def _direct_floor(samples: int) -> dict[str, Any]:
    backend = FakeBackend()
    port = await backend.start()
    took = []
    try:
        for _ in range(samples):
            n = len(backend.started)
            t0 = time.perf_counter()
            client = await open_client("127.0.0.1", port, startup_packet(APP_ROLE, "postgres"))
            await backend.until(lambda n=n: len(backend.started) > n)
            took.append((backend.started[n].started_at or 0) - t0)
            client.abort()
    finally:
        backend.close()
    return {"target": "direct", "samples": len(took), "startup_s": stats.summary(took),
            "query_s": stats.summary([]), "client_s": stats.summary([])}


async def _handoff_one(kind: str, port: int, backend: FakeBackend, samples: int,
                       now: dict[str, str]) -> dict[str, Any]:
    startup = startup_packet(APP_ROLE, "postgres", "loadtest-handoff")
    clients = [await open_client("127.0.0.1", port, startup)]
    to_startup, to_query, to_client = [], [], []
    try:
        await backend.until(lambda: any(s.queried_at for s in backend.started))
        active = next(s for s in backend.started if s.queried_at)
        for i in range(samples):
            while sum(not c.closed for c in clients) < DEPTH + 1:
                clients.append(await open_client("127.0.0.1", port, startup))
            await wait_for(_all_read(port, 0, clients, kind == "pgbouncer"),
                           f"{kind} to read every waiting client", 30, interval=0.001)
            now["what"] = f"{kind} {i + 1}/{samples}"
            n = len(backend.started)
            assert active.transport is not None
            t_free = time.perf_counter()
            active.transport.close()  # the slot frees: the server ends the holder's session
            await backend.until(lambda n=n: len(backend.started) > n)
            nxt = backend.started[n]
            await backend.until(lambda nxt=nxt: nxt.queried_at is not None)
            to_startup.append((nxt.started_at or 0) - t_free)
            to_query.append((nxt.queried_at or 0) - t_free)
            if kind == "slotproxy":
                admitted = [c for c in clients if c.first_byte_at is not None and c.first_byte_at >= t_free]
                if admitted:
                    to_client.append(min(c.first_byte_at or 0 for c in admitted) - t_free)
            active = nxt
            clients = [c for c in clients if not c.closed]
    finally:
        for c in clients:
            c.abort()
    return {"target": kind, "samples": len(to_startup), "startup_s": stats.summary(to_startup),
            "query_s": stats.summary(to_query), "client_s": stats.summary(to_client)}


def handoff_table(section: dict[str, Any]) -> str:
    res = section["results"]
    rows: list[Row] = []
    for key, label in (("startup_s", "to startup at server"), ("query_s", "to first query at server"),
                       ("client_s", "to waiter's first byte")):
        for q in ("p50", "p99", "max"):
            rows.append((f"{label} {q}", [fmt_s(r[key][q]) for r in res],
                         [fmt_ratio(r.get("ratio_to_first")) if key == "startup_s" and q == "p50" else ""
                          for r in res]))
    return grid(f"== handoff: {section['description']}", [r["target"] for r in res], rows, ratios=False) + \
        "\n  direct: a new client's own connect-to-startup time, for scale; " \
        "ratios vs slotproxy in the JSON file"

"""The incident scenarios: burst, churn, leak, external, restart.

Each runs against one target at a time (in spawn mode they share one
server), records every client in a Recorder, and returns a JSON-ready
section from which the report's table is drawn.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from . import stats
from .clients import CLIENT_ERRORS, Outcome, Recorder, Work, describe, session
from .context import Context
from .targets import Target, mask_passwords

RETRY_INTERVAL = 0.05  # how soon a refused external job tries again

Body = Callable[[Context, Target, Recorder, Work], Awaitable[dict[str, Any]]]


async def arrivals(target: Target, work: Work, rec: Recorder, *, rate: float, duration: float,
                   seed: int) -> None:
    """Clients arriving at `rate` per second (Poisson, seeded) for `duration` seconds."""
    rng = random.Random(seed)  # the same schedule for every target
    loop = asyncio.get_running_loop()
    start = loop.time()
    at = rng.expovariate(rate)
    async with asyncio.TaskGroup() as tg:
        while at < duration:
            delay = start + at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)  # the arrival schedule
            tg.create_task(session({"dsn": target.dsn}, work, rec))
            at += rng.expovariate(rate)


class Held:
    """Connections opened aside from the measured clients (leaked, external) and kept open."""

    def __init__(self, rec: Recorder) -> None:
        self.rec = rec
        self.conns: list[asyncpg.Connection] = []
        self.refused: Counter[str] = Counter()
        self._ids: list[int] = []

    async def open(self, dsn: str, count: int, timeout: float, retry_for: float = 0.0) -> None:
        """Open `count` connections, each running one query; a refused one tries again for up to
        `retry_for` seconds."""
        loop = asyncio.get_running_loop()
        until = loop.time() + retry_for

        async def one() -> None:
            while True:
                conn = None
                try:
                    conn = await asyncpg.connect(dsn, timeout=timeout)
                    # As a script does before it hangs; through PgBouncer, only a query takes a server.
                    await conn.execute("select 1", timeout=timeout)
                    break
                except CLIENT_ERRORS as e:
                    if conn is not None:
                        conn.terminate()
                    sqlstate, message = describe(e)
                    self.refused[sqlstate or message.split(":", 1)[0]] += 1
                    if loop.time() >= until:
                        return
                await asyncio.sleep(RETRY_INTERVAL)
            self.conns.append(conn)
            me = self.rec.next_id()
            self._ids.append(me)
            self.rec.open.add(me)  # they hold slots: the timeline shows them

        await asyncio.gather(*(one() for _ in range(count)))

    async def close(self) -> None:
        for me in self._ids:
            self.rec.open.discard(me)
        for conn in self.conns:
            try:
                await asyncio.wait_for(conn.close(), 5)
            except CLIENT_ERRORS:
                conn.terminate()
        self.conns.clear()

    def terminate(self) -> None:
        for conn in self.conns:
            conn.terminate()


# -- the scenarios ---------------------------------------------------------------------------


async def _burst(ctx: Context, target: Target, rec: Recorder, work: Work) -> dict[str, Any]:
    async with asyncio.TaskGroup() as tg:
        for _ in range(ctx.knobs.clients):
            tg.create_task(session({"dsn": target.dsn}, work, rec))
    return {}


async def _churn(ctx: Context, target: Target, rec: Recorder, work: Work) -> dict[str, Any]:
    await arrivals(target, work, rec, rate=ctx.knob("churn", "rate"), duration=ctx.knobs.duration,
                   seed=ctx.knobs.seed)
    return {}


async def _leak(ctx: Context, target: Target, rec: Recorder, work: Work) -> dict[str, Any]:
    leaked = Held(rec)
    try:
        await leaked.open(target.dsn, ctx.knobs.leaked, ctx.connect_timeout)
        rec.mark(f"{len(leaked.conns)} leaked sessions open")
        await arrivals(target, work, rec, rate=ctx.knob("leak", "rate"), duration=ctx.knobs.duration,
                       seed=ctx.knobs.seed)
    finally:
        held = len(leaked.conns)
        await leaked.close()
    return {"leaked held": held, "leaked refused by code": dict(leaked.refused)}


async def _external(ctx: Context, target: Target, rec: Recorder, work: Work) -> dict[str, Any]:
    ctx.require("external")
    duration = ctx.knobs.duration
    at, hold = ctx.moment("external_at"), ctx.moment("external_for")
    outsiders = Held(rec)
    held = 0

    async def outside() -> None:
        nonlocal held
        await asyncio.sleep(at)  # when the dashboard or batch job comes along
        rec.mark(f"{ctx.knobs.external} external connections")
        # A batch job retries until it has its connections, for as long as it means to hold them.
        await outsiders.open(ctx.server_dsn or "", ctx.knobs.external, ctx.connect_timeout, retry_for=hold)
        held = len(outsiders.conns)
        await asyncio.sleep(max(0.0, hold - (rec.now() - at)))  # how long it keeps them
        await outsiders.close()
        rec.mark("external connections closed")

    try:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(outside())
            tg.create_task(arrivals(target, work, rec, rate=ctx.knob("external", "rate"),
                                    duration=duration, seed=ctx.knobs.seed))
    finally:
        outsiders.terminate()
    return {"external held": held, "external refusals": sum(outsiders.refused.values()),
            "external refused by code": dict(outsiders.refused)}


async def _restart(ctx: Context, target: Target, rec: Recorder, work: Work) -> dict[str, Any]:
    ctx.require("restart")
    restart = ctx.restarter()
    assert restart is not None
    duration = ctx.knobs.duration
    at = ctx.moment("restart_at")
    took: list[float] = []

    async def restarting() -> None:
        await asyncio.sleep(at)  # when the server restarts
        rec.mark("server restart begins")
        started = time.perf_counter()
        await restart()
        took.append(time.perf_counter() - started)
        rec.mark("server is back")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(restarting())
        tg.create_task(arrivals(target, work, rec, rate=ctx.knob("restart", "rate"), duration=duration,
                                seed=ctx.knobs.seed))
    return {"restart took s": round(took[0], 3) if took else None}


SESSION_SCENARIOS: dict[str, tuple[Body, Callable[[Context], str]]] = {
    "burst": (_burst, lambda c: f"{c.knobs.clients} clients arrive at once; each holds its session "
                                f"{c.knob('burst', 'hold'):g} s running {c.knobs.query!r}"),
    "churn": (_churn, lambda c: f"a new connection per request, {c.knob('churn', 'rate'):g}/s for "
                                f"{c.knobs.duration:g} s; each runs {c.knobs.query!r}, "
                                f"holds {c.knob('churn', 'hold'):g} s"),
    "leak": (_leak, lambda c: f"{c.knobs.leaked} sessions opened and never closed, while "
                              f"{c.knob('leak', 'rate'):g} clients/s hold {c.knob('leak', 'hold'):g} s "
                              f"each for {c.knobs.duration:g} s"),
    "external": (_external, lambda c: f"{c.knobs.external} connections straight to the server take slots "
                                      f"mid-run, while {c.knob('external', 'rate'):g} clients/s hold "
                                      f"{c.knob('external', 'hold'):g} s each for {c.knobs.duration:g} s"),
    "restart": (_restart, lambda c: f"the server restarts mid-run, while {c.knob('restart', 'rate'):g} "
                                    f"clients/s hold {c.knob('restart', 'hold'):g} s each for "
                                    f"{c.knobs.duration:g} s"),
}


async def run_sessions(name: str, ctx: Context) -> dict[str, Any]:
    body, describe_it = SESSION_SCENARIOS[name]
    work = Work(hold=ctx.knob(name, "hold"), query=ctx.knobs.query, think=ctx.knobs.think,
                timeout=ctx.connect_timeout, query_timeout=ctx.connect_timeout)
    results = []
    for target in ctx.targets:
        rec = Recorder(name, target.name)
        sampler = asyncio.get_running_loop().create_task(rec.sampling(ctx.knobs.sample_interval))
        try:
            with ctx.progress.showing(rec.status):
                extra = await body(ctx, target, rec, work)
        except BaseExceptionGroup as group:  # from a TaskGroup: the error itself, as everywhere else
            raise _first_error(group) from group
        finally:
            sampler.cancel()
        wall = rec.now()
        rec.sample()
        results.append(summarize(rec, wall, extra, target.kind))
        await ctx.settle()
    add_ratios(results)
    return {
        "scenario": name, "kind": "sessions", "description": describe_it(ctx),
        "params": {"hold": work.hold, "query": work.query, "think": work.think,
                   "connect_timeout": work.timeout, **_params(name, ctx)},
        "results": results,
    }


def _first_error(group: BaseExceptionGroup) -> BaseException:
    """The first error of a task group's (of several, the others are alike or follow from it)."""
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


def _params(name: str, ctx: Context) -> dict[str, Any]:
    k = ctx.knobs
    if name == "burst":
        return {"clients": k.clients}
    found: dict[str, Any] = {"rate": ctx.knob(name, "rate"), "duration": k.duration, "seed": k.seed}
    if name == "leak":
        found["leaked"] = k.leaked
    if name == "external":
        found.update(external=k.external, external_at=ctx.moment("external_at"),
                     external_for=ctx.moment("external_for"))
    if name == "restart":
        found.update(restart_at=ctx.moment("restart_at"),
                     restart_command=mask_passwords(k.restart_command) if k.restart_command else None)
    return found


def summarize(rec: Recorder, wall: float, extra: dict[str, Any], kind: str = "given") -> dict[str, Any]:
    outs: list[Outcome] = rec.outcomes
    connected = [o for o in outs if o.ok or o.phase != "connect"]
    succeeded = sum(o.ok for o in outs)
    latencies = [lat for o in outs for lat in o.latencies]
    messages = Counter(f"{o.sqlstate}: {o.message}" if o.sqlstate else str(o.message)
                       for o in outs if not o.ok)
    return {
        "target": rec.target,
        "kind": kind,
        "attempts": len(outs),
        "succeeded": succeeded,
        "refused": dict(sorted(Counter(o.code for o in outs if not o.ok and o.phase == "connect").items())),
        "failed_first_query": dict(sorted(Counter(o.code for o in outs if o.phase == "first query").items())),
        "broken": dict(sorted(Counter(o.code for o in outs if o.phase == "session").items())),
        "messages": dict(messages.most_common()),
        "connect_wait_s": stats.summary([o.connect_wait for o in connected]),
        "first_answer_s": stats.summary([o.first_answer for o in outs if o.first_answer is not None]),
        "query_latency_s": stats.summary(latencies, (50, 99)),
        "queries": len(latencies),
        "wall_s": round(wall, 3),
        "queries_per_s": len(latencies) / wall if wall > 0 else None,
        "sessions_per_s": succeeded / wall if wall > 0 else None,
        "extra": extra,
        "marks": rec.marks,
        "timeline": {"t": [s[0] for s in rec.timeline], "open": [s[1] for s in rec.timeline],
                     "waiting": [s[2] for s in rec.timeline], "errors": [s[3] for s in rec.timeline]},
    }


RATIO_FIGURES = {
    "succeeded": lambda r: r["succeeded"],
    "connect_wait_p50": lambda r: r["connect_wait_s"]["p50"],
    "connect_wait_p95": lambda r: r["connect_wait_s"]["p95"],
    "connect_wait_p99": lambda r: r["connect_wait_s"]["p99"],
    "connect_wait_max": lambda r: r["connect_wait_s"]["max"],
    "first_answer_p50": lambda r: r["first_answer_s"]["p50"],
    "first_answer_p99": lambda r: r["first_answer_s"]["p99"],
    "query_latency_p50": lambda r: r["query_latency_s"]["p50"],
    "query_latency_p99": lambda r: r["query_latency_s"]["p99"],
    "queries_per_s": lambda r: r["queries_per_s"],
    "sessions_per_s": lambda r: r["sessions_per_s"],
}


def add_ratios(results: list[dict[str, Any]]) -> None:
    """Each target's figures divided by the first target's."""
    if not results:
        return
    ref = results[0]
    for r in results:
        r["ratio_to_first"] = {k: stats.ratio(get(r), get(ref)) for k, get in RATIO_FIGURES.items()}

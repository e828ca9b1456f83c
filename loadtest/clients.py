"""asyncpg clients that record what happened to them.

A client connects (the connect wait is measured from the call until the
session is usable), runs its query, keeps running it for `hold` seconds
after the first answer, and closes. Hold time counts from the first answer
because PgBouncer logs a client in itself and makes it wait for a server
at its first query instead; so where a client fails is kept too: at
connect (refused), at its first query (where PgBouncer refuses), or later
(broken). What it was told is kept by SQLSTATE; errors without one (a
refused TCP connect, a timeout, a dropped connection) are kept under the
exception's class name.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import asyncpg

# What a client can meet while connecting or in its session; anything else is a harness bug.
# asyncpg raises InternalClientError for a query on a session the server ended between
# queries (a restart's 57P01 arriving while idle).
CLIENT_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError,
                 TimeoutError)


@dataclass(slots=True)
class Outcome:
    ok: bool
    connect_wait: float  # seconds from the connect call to a usable session, or to the refusal
    sqlstate: str | None = None
    message: str | None = None
    phase: str = "connect"  # where it failed: "connect" (refused), "first query", "session" (later)
    started: float = 0.0  # seconds after the run began
    first_answer: float | None = None  # seconds from the connect call to the first query's answer
    latencies: list[float] = field(default_factory=list)  # one per query that succeeded

    @property
    def code(self) -> str:
        """The SQLSTATE, or for errors without one the exception's class name."""
        return self.sqlstate or (self.message or "error").split(":", 1)[0]


def describe(exc: BaseException) -> tuple[str | None, str]:
    if isinstance(exc, asyncpg.PostgresError):
        return exc.sqlstate, str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return None, f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class Recorder:
    """Live state of one target's run: who waits, who holds a session, what happened.

    `waiting` and `open` are sets of client ids, so the counts shown are the
    sizes of what is there, not counters that could drift.
    """

    def __init__(self, scenario: str, target: str) -> None:
        self.scenario = scenario
        self.target = target
        self.t0 = time.perf_counter()
        self.waiting: set[int] = set()
        self.open: set[int] = set()
        self.outcomes: list[Outcome] = []
        self.errors = 0
        self.marks: list[tuple[float, str]] = []  # (seconds, what happened): restarts and the like
        self.timeline: list[tuple[float, int, int, int]] = []  # (t, open, waiting, errors so far)
        self._ids = 0

    def now(self) -> float:
        return time.perf_counter() - self.t0

    def mark(self, what: str) -> None:
        self.marks.append((round(self.now(), 3), what))

    def next_id(self) -> int:
        self._ids += 1
        return self._ids

    def sample(self) -> None:
        self.timeline.append((round(self.now(), 3), len(self.open), len(self.waiting), self.errors))

    def add(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)
        if not outcome.ok:
            self.errors += 1

    def status(self) -> str:
        ok = sum(o.ok for o in self.outcomes)
        refused = sum(1 for o in self.outcomes if not o.ok and o.phase == "connect")
        broken = len(self.outcomes) - ok - refused
        return (f"{self.scenario} {self.target}: {self.now():5.1f} s  waiting {len(self.waiting):4d}  "
                f"open {len(self.open):3d}  done {len(self.outcomes):5d}  ok {ok}  refused {refused}  "
                f"broken {broken}")

    async def sampling(self, interval: float) -> None:
        """Sample the timeline every `interval` seconds until cancelled."""
        while True:
            self.sample()
            await asyncio.sleep(interval)  # the timeline's resolution


@dataclass(frozen=True, slots=True)
class Work:
    """What a client does once connected."""

    hold: float = 0.5  # seconds to keep the session after the first answer; at least one query runs
    query: str = "select 1"
    think: float = 0.02  # seconds between queries, like an application doing its own work
    timeout: float = 60.0  # connect timeout; set it above the proxy's queue timeout
    query_timeout: float = 60.0  # each query's; the first may wait for a server (PgBouncer)


async def session(connect: dict[str, Any], work: Work, rec: Recorder | None = None) -> Outcome:
    """One client's life: connect, query for `work.hold` seconds, close."""
    me = rec.next_id() if rec else 0
    started = time.perf_counter()
    outcome = Outcome(False, 0.0, started=rec.now() if rec else 0.0)
    if rec:
        rec.waiting.add(me)
    try:
        conn = await asyncpg.connect(**connect, timeout=work.timeout)
    except CLIENT_ERRORS as e:
        outcome.connect_wait = time.perf_counter() - started
        outcome.sqlstate, outcome.message = describe(e)
        return _done(rec, outcome)
    finally:
        if rec:
            rec.waiting.discard(me)
    outcome.connect_wait = time.perf_counter() - started
    if rec:
        rec.open.add(me)
    try:
        first = None
        while True:
            t = time.perf_counter()
            await conn.execute(work.query, timeout=work.query_timeout)
            done = time.perf_counter()
            outcome.latencies.append(done - t)
            if first is None:
                first = done
                outcome.first_answer = done - started
            if done - first >= work.hold:
                break
            if work.think:
                await asyncio.sleep(work.think)
        outcome.ok = True
    except CLIENT_ERRORS as e:
        outcome.phase = "session" if first is not None else "first query"
        outcome.sqlstate, outcome.message = describe(e)
    except BaseException:
        conn.terminate()  # cancelled (Ctrl-C, SIGTERM): no waiting for a polite close
        raise
    finally:
        if rec:
            rec.open.discard(me)
    try:
        await asyncio.wait_for(conn.close(), 5)
    except CLIENT_ERRORS:
        conn.terminate()
    return _done(rec, outcome)


def _done(rec: Recorder | None, outcome: Outcome) -> Outcome:
    if rec:
        rec.add(outcome)
    return outcome


async def one_client(host: str, port: int, user: str, database: str, hold: float,
                     timeout: float = 60.0) -> Outcome:
    """Connect, run a query that holds the session for `hold` seconds, close (used by the tests)."""
    return await session(dict(host=host, port=port, user=user, database=database, ssl=False),
                         Work(hold=0, query=f"select pg_sleep({float(hold)!r})", think=0,
                              timeout=timeout, query_timeout=hold + timeout))

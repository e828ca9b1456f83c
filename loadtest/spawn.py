"""`--spawn`: a throwaway server, slotproxy in front of it, and PgBouncer in session mode.

All three targets share one server with a small max_connections, so they
run one after another and `settle()` waits between runs until the server
has no client sessions left (PgBouncer keeps its server sessions pooled;
those are ended, so that every run starts with every slot free).
"""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg

from slotproxy.cluster import SUPERUSER, Cluster, Template, free_port

from .procs import (
    ForwarderProcess,
    PgBouncerProcess,
    SlotproxyProcess,
    cpu_list,
    pgbouncer_binary,
    raise_fd_limit,
    run_captured,
    scratch_dir,
    set_cpus,
)
from .targets import Target, UsageError

APP_ROLE = "app"
KINDS = ("direct", "slotproxy", "pgbouncer")
# Only when named in --spawn-targets. forwarder: the floor of a transport relay, for pgbench
# and relay; it has no queue, so the scenarios that exhaust slots see the server's refusals
# through it. pgbouncer-unpooled: PgBouncer opening a server session per client, as slotproxy
# does: the like-for-like peer with a new connection per transaction (pgbench -C).
OPTIONAL_KINDS = ("forwarder", "pgbouncer-unpooled")
SETTLE_TIMEOUT = 30.0

T = TypeVar("T")


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run a blocking call in a thread; if cancelled, let the thread finish first.

    So that cleanup never races a half-done pg_ctl start.
    """
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.wait([future])
        raise


@dataclass(frozen=True, slots=True)
class SpawnOptions:
    max_connections: int = 20
    reserved: int = 3  # superuser_reserved_connections, PostgreSQL's default
    proxy_slots: int | None = None  # default: max_connections - reserved
    queue_timeout: float = 30.0
    max_queue: int = 10_000  # room for the 5,000 waiting clients of the `waiters` measurement
    kinds: tuple[str, ...] = KINDS
    kinds_given: bool = False  # the user named the targets: a missing PgBouncer is an error
    server_socket: bool = False  # the proxies reach the server over its Unix socket, not TCP
    # CPUs of the proxies' own; the server, pgbench and the harness get the others. Empty: all share.
    proxy_cpus: frozenset[int] = frozenset()

    @property
    def slots(self) -> int:
        return self.proxy_slots or max(1, self.max_connections - self.reserved)


class Environment:
    """Everything `--spawn` started; `async with` stops it all, also on errors and Ctrl-C."""

    def __init__(self, options: SpawnOptions, template: Template | None = None) -> None:
        self.options = options
        self._given_template = template
        self.template: Template | None = None
        self.cluster: Cluster | None = None
        self.workdir: Path | None = None
        self.children: list[SlotproxyProcess | PgBouncerProcess | ForwarderProcess] = []
        self.targets: list[Target] = []
        self.notes: list[str] = []
        self.pgbench_ready = False
        self.other_cpus: frozenset[int] = frozenset()
        self._own_cpus: set[int] | None = None  # ours before --proxy-cpus moved us; given back at close

    @property
    def server_dsn(self) -> str:
        """The server itself, as the application role (what `external` connections use)."""
        assert self.cluster is not None
        return self.cluster.dsn(APP_ROLE) + "?sslmode=disable"

    @property
    def superuser_dsn(self) -> str:
        assert self.cluster is not None
        return self.cluster.dsn(SUPERUSER) + "?sslmode=disable"

    async def __aenter__(self) -> Environment:
        try:
            await self._start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _start(self) -> None:
        opts = self.options
        for kind in opts.kinds:
            if kind not in KINDS + OPTIONAL_KINDS:
                raise UsageError(f"--spawn-targets: unknown target {kind!r} "
                                 f"(choose from {', '.join(KINDS + OPTIONAL_KINDS)})")
        want_bouncer = "pgbouncer" in opts.kinds or "pgbouncer-unpooled" in opts.kinds
        if want_bouncer and pgbouncer_binary() is None:
            if opts.kinds_given:
                raise UsageError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
            self.notes.append("PgBouncer is not installed, so it is left out "
                              "(Debian: apt-get install pgbouncer)")
            want_bouncer = False
        raise_fd_limit()
        cpus = opts.proxy_cpus or None
        if cpus:
            # Ours first: the server (via pg_ctl), pgbench and psql inherit it.
            self._own_cpus = os.sched_getaffinity(0)
            self.other_cpus = frozenset(self._own_cpus - cpus)
            set_cpus(os.getpid(), self.other_cpus)
            self.notes.append(f"proxies on CPU {cpu_list(cpus)}; the server, pgbench and the "
                              f"harness's own clients on CPU {cpu_list(self.other_cpus)}")
        self.workdir = scratch_dir("loadtest-")
        self.template = self._given_template or await blocking(Template)
        self.cluster = self.template.cluster(
            max_connections=opts.max_connections, superuser_reserved_connections=opts.reserved,
            # Connection log lines would cost every backend start the same; leave them out.
            settings={"log_connections": "off", "log_disconnections": "off"})
        await blocking(self.cluster.start)
        await blocking(self.cluster.psql, f"do $$ begin create role {APP_ROLE} login; "
                                          "exception when duplicate_object then null; end $$")
        backend = (self.cluster.socket_dir if opts.server_socket else self.cluster.host, self.cluster.port)
        for kind in opts.kinds:
            if kind == "direct":
                self.targets.append(Target("direct", self.server_dsn, "direct"))
            elif kind == "slotproxy":
                proxy = await SlotproxyProcess.start(
                    self.workdir, backend, slots=opts.slots, max_queue=opts.max_queue,
                    queue_timeout=opts.queue_timeout, cpus=cpus)
                self.children.append(proxy)
                self.targets.append(Target("slotproxy", _dsn(proxy.port), "slotproxy", proxy.pid))
            elif kind == "forwarder":
                forwarder = await ForwarderProcess.start(self.workdir, backend, cpus=cpus)
                self.children.append(forwarder)
                self.targets.append(Target("forwarder", _dsn(forwarder.port), "forwarder", forwarder.pid))
            elif want_bouncer:  # pgbouncer, pgbouncer-unpooled
                bouncer = await PgBouncerProcess.start(
                    self.workdir, backend, free_port(), pool_size=opts.slots,
                    users=[APP_ROLE, SUPERUSER], max_clients=opts.max_queue + opts.slots + 100,
                    query_wait_timeout=opts.queue_timeout, unpooled=kind == "pgbouncer-unpooled",
                    cpus=cpus)
                self.children.append(bouncer)
                self.targets.append(Target(kind, _dsn(bouncer.port), kind, bouncer.pid))

    def describe(self) -> dict[str, Any]:
        opts = self.options
        assert self.cluster is not None
        return {"server": f"{self.cluster.host}:{self.cluster.port}",
                "proxies_reach_server_over": "unix socket" if opts.server_socket else "tcp",
                "max_connections": opts.max_connections, "superuser_reserved_connections": opts.reserved,
                "proxy_slots": opts.slots, "queue_timeout": opts.queue_timeout,
                "max_queue": opts.max_queue,
                "proxy_cpus": sorted(opts.proxy_cpus) or None,
                "other_cpus": sorted(self.other_cpus) or None}

    async def settle(self) -> None:
        """Wait until the server has no client sessions but ours; end PgBouncer's pooled ones."""
        conn = await asyncpg.connect(self.superuser_dsn, timeout=10)
        try:
            others = ("from pg_stat_activity where backend_type = 'client backend' "
                      "and pid <> pg_backend_pid()")
            left: list[int] = []

            async def check() -> None:
                left[:] = [await conn.fetchval(f"select count(*) {others}")]
                if left[0]:
                    await conn.execute(f"select pg_terminate_backend(pid) {others} and state = 'idle'")

            deadline = asyncio.get_running_loop().time() + SETTLE_TIMEOUT
            while True:
                await check()
                if not left[0]:
                    return
                if asyncio.get_running_loop().time() > deadline:
                    raise RuntimeError(f"{left[0]} sessions still open on the server "
                                       f"{SETTLE_TIMEOUT:g} s after the run")
                await asyncio.sleep(0.02)  # poll interval while the last backends exit
        finally:
            await conn.close()

    async def restart_server(self) -> None:
        assert self.cluster is not None
        await blocking(self.cluster.restart)

    async def prepare_pgbench(self, scale: int) -> None:
        """pgbench's tables, made by the superuser, readable by the application role."""
        if self.pgbench_ready:
            return
        assert self.cluster is not None
        status, out, _ = await run_captured([pgbench_path(), "-i", "-q", "-s", str(scale),
                                             self.superuser_dsn])
        if status != 0:
            raise RuntimeError(f"pgbench -i failed:\n{out.decode(errors='replace')}")
        await blocking(self.cluster.psql, f"grant select on all tables in schema public to {APP_ROLE}")
        self.pgbench_ready = True

    async def close(self) -> None:
        """Stop what was started; interrupted meanwhile (a second Ctrl-C), kill the rest at once."""
        children, self.children = self.children[::-1], []
        cluster, self.cluster = self.cluster, None
        try:
            try:
                for child in children:
                    await child.stop()
            except BaseException:
                for child in children:
                    child.kill()
                if cluster is not None:
                    cluster.remove()  # no await: this task may be cancelled again
                raise
            if cluster is not None:
                await blocking(cluster.remove)  # cancelled meanwhile, its thread still finishes
        finally:
            self._remove_files()
            if self._own_cpus is not None:  # an in-process caller (the tests) goes on with every CPU
                set_cpus(os.getpid(), self._own_cpus)
                self._own_cpus = None

    def _remove_files(self) -> None:
        if self.template is not None and self._given_template is None:
            self.template.remove()
        self.template = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


def _dsn(port: int, user: str = APP_ROLE) -> str:
    return f"postgresql://{user}@127.0.0.1:{port}/postgres?sslmode=disable"


def pgbench_path() -> str:
    found = shutil.which("pgbench")
    if found:
        return found
    from slotproxy.cluster import find_bindir

    candidate = find_bindir() / "pgbench"
    if candidate.exists():
        return str(candidate)
    raise UsageError("pgbench not found (Debian: it comes with the postgresql package)")


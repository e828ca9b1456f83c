"""instructions: what each proxy executes per client connection and per transaction.

Counted by valgrind's callgrind in the proxy's own process (user space; the
kernel's work is not in it). Unlike a time, the count is the same whatever
else the machine is doing, so it shows changes of a few percent that timings
on a shared machine cannot. Each proxy is started again under valgrind, in
front of the spawned server, and driven by pgbench:

  per connection   pgbench -S -C: accept to close, the server connection included
                   (PgBouncer reuses pooled server sessions, so its figure has none)
  per transaction  pgbench -S on open sessions: one query and its result relayed

Besides slotproxy and PgBouncer, `forwarder` (loadtest.forwarder) is a bare
uvloop Protocol forwarder: the floor of a relay on asyncio transports.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from .context import Context
from .procs import (
    Child,
    ForwarderProcess,
    PgBouncerProcess,
    SlotproxyProcess,
    run_captured,
    scratch_dir,
    server_account,
)
from .report import Row, fmt_ratio, grid
from .spawn import APP_ROLE, pgbench_path

READY_TIMEOUT = 120  # Python under valgrind starts some fifty times slower
CONTROL_TIMEOUT = 120  # callgrind_control waits for valgrind to take its command up
PGBENCH_CLIENTS = 4  # sessions of the per-transaction run, counted out of it


def valgrind_binaries() -> tuple[str, str] | None:
    valgrind, control = shutil.which("valgrind"), shutil.which("callgrind_control")
    return (valgrind, control) if valgrind and control else None


async def instructions(ctx: Context) -> dict[str, Any]:
    k = ctx.knobs
    section: dict[str, Any] = {
        "scenario": "instructions", "kind": "instructions",
        "description": f"user-space instructions (valgrind callgrind): {k.instr_connections} connections "
                       f"(pgbench -S -C), {k.instr_transactions} transactions "
                       f"(pgbench -S -c {PGBENCH_CLIENTS})",
        "params": {"connections": k.instr_connections, "transactions": k.instr_transactions},
        "results": []}
    binaries = valgrind_binaries()
    if ctx.env is None or binaries is None:
        section["skipped"] = ("needs --spawn (it starts each proxy under valgrind itself)" if ctx.env is None
                              else "valgrind is not installed (Debian: apt-get install valgrind)")
        return section
    env = ctx.env
    await env.prepare_pgbench(k.pgbench_scale)
    assert env.cluster is not None
    backend = (env.cluster.socket_dir if env.options.server_socket else env.cluster.host, env.cluster.port)
    spawned = {t.kind for t in env.targets}
    kinds = ["slotproxy", *(k for k in ("pgbouncer", "pgbouncer-unpooled") if k in spawned), "forwarder"]
    workdir = scratch_dir("loadtest-instructions-")
    now = {"what": "starting"}
    try:
        with ctx.progress.showing(lambda: f"instructions {now['what']}"):
            for kind in kinds:
                now["what"] = f"{kind}: starting under valgrind"
                section["results"].append(await _count(ctx, kind, backend, workdir, binaries, now))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    first = section["results"][0]
    for r in section["results"]:
        for key in ("per_connection", "per_transaction"):
            r[f"{key}_ratio_to_first"] = r[key] / first[key] if first[key] else None
    return section


async def _count(ctx: Context, kind: str, backend: tuple[str, int], workdir: Path,
                 binaries: tuple[str, str], now: dict[str, str]) -> dict[str, Any]:
    valgrind, control = binaries
    k = ctx.knobs
    # PgBouncer runs as postgres when we are root: its profile goes where it may write.
    account = server_account() if kind.startswith("pgbouncer") else None
    outdir = workdir / f"callgrind-{kind}"
    outdir.mkdir()
    if account is not None:
        os.chown(outdir, account.pw_uid, account.pw_gid)
    # Its control pipes in our scratch directory, and for PgBouncer (as postgres) where it may write.
    vgdb = f"--vgdb-prefix={outdir}/vgdb"
    wrap = [valgrind, "--tool=callgrind", f"--callgrind-out-file={outdir}/callgrind.out", vgdb]
    proc: Child
    if kind == "slotproxy":
        proc = await SlotproxyProcess.start(workdir, backend, slots=env_slots(ctx), max_queue=1000,
                                            queue_timeout=120, wrap=wrap, ready_timeout=READY_TIMEOUT,
                                            cpus=ctx.proxy_cpus)
    elif kind.startswith("pgbouncer"):
        proc = await PgBouncerProcess.start(workdir, backend, _free_port(), pool_size=env_slots(ctx),
                                            users=[APP_ROLE], max_clients=1000, query_wait_timeout=120,
                                            unpooled=kind == "pgbouncer-unpooled", wrap=wrap,
                                            ready_timeout=READY_TIMEOUT, cpus=ctx.proxy_cpus)
    else:
        proc = await ForwarderProcess.start(workdir, backend, wrap=wrap, ready_timeout=READY_TIMEOUT,
                                            cpus=ctx.proxy_cpus)
    dsn = f"postgresql://{APP_ROLE}@127.0.0.1:{proc.port}/postgres?sslmode=disable"  # type: ignore[attr-defined]
    # callgrind_control finds the pipes by user name from the environment, so it runs as
    # PgBouncer does: setpriv keeps the environment (runuser would set USER).
    run_as: list[str] = []
    if account is not None:
        run_as = (["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                   "--clear-groups", "--"] if shutil.which("setpriv")
                  else ["runuser", "-u", account.pw_name, "--"])
    control_argv = [*run_as, control, vgdb]
    try:
        now["what"] = f"{kind}: warming up"
        await _pgbench(dsn, "-C", "-c", "2", "-t", "10")
        await _pgbench(dsn, "-c", str(PGBENCH_CLIENTS), "-t", "25")
        now["what"] = f"{kind}: {k.instr_connections} connections"
        await _control(control_argv, "-z", proc.pid)
        await _pgbench(dsn, "-C", "-c", "2", "-t", str(k.instr_connections // 2))
        await _control(control_argv, "-d", proc.pid)
        now["what"] = f"{kind}: {k.instr_transactions} transactions"
        await _control(control_argv, "-z", proc.pid)
        await _pgbench(dsn, "-c", str(PGBENCH_CLIENTS), "-t", str(k.instr_transactions // PGBENCH_CLIENTS))
        await _control(control_argv, "-d", proc.pid)
    finally:
        await proc.stop(timeout=30)
    connections = (k.instr_connections // 2) * 2
    transactions = (k.instr_transactions // PGBENCH_CLIENTS) * PGBENCH_CLIENTS
    per_connection = _total(outdir / "callgrind.out.1") / connections
    # The run's own connections are counted out at the rate just measured.
    per_transaction = (_total(outdir / "callgrind.out.2") - PGBENCH_CLIENTS * per_connection) / transactions
    return {"target": kind, "per_connection": round(per_connection),
            "per_transaction": round(per_transaction)}


def env_slots(ctx: Context) -> int:
    assert ctx.env is not None
    return ctx.env.options.slots


def _free_port() -> int:
    from slotproxy.cluster import free_port
    return free_port()


async def _pgbench(dsn: str, *args: str) -> None:
    status, out, _ = await run_captured([pgbench_path(), "-n", "-S", "-j", "1", *args, dsn])
    if status != 0:
        raise RuntimeError(f"pgbench {' '.join(args)} failed:\n{out.decode(errors='replace')[-600:]}")


async def _control(argv: list[str], command: str, pid: int) -> None:
    status, out, _ = await run_captured([*argv, command, str(pid)], CONTROL_TIMEOUT)
    if status != 0 or b"OK" not in out:
        raise RuntimeError(f"callgrind_control {command} {pid} failed:\n{out.decode(errors='replace')}")


def _total(path: Path) -> int:
    m = re.search(r"^summary: (\d+)$", path.read_text(errors="replace"), re.M)
    if m is None:
        raise RuntimeError(f"no instruction total in {path}")
    return int(m.group(1))


def table(section: dict[str, Any]) -> str:
    title = f"== instructions: {section['description']}"
    if "skipped" in section:
        return f"{title}\n  skipped: {section['skipped']}"
    res = section["results"]
    rows: list[Row] = [
        (label, [f"{r[key]:,}" for r in res], [fmt_ratio(r[f"{key}_ratio_to_first"]) for r in res])
        for key, label in (("per_connection", "per connection"), ("per_transaction", "per transaction"))]
    return grid(title, [r["target"] for r in res], rows) + \
        "\n  counted in the proxy's process, kernel excluded; forwarder: a bare uvloop forwarder, " \
        "the floor of a transport relay" + \
        ("; pgbouncer reuses server sessions, pgbouncer-unpooled opens one per client as slotproxy does"
         if any(r["target"] == "pgbouncer-unpooled" for r in res) else "")

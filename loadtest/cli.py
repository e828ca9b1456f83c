"""python -m loadtest [--spawn | --target NAME=DSN ...] SCENARIO [SCENARIO ...] [knobs]

Exit codes: 0 done, 1 a run failed, 2 bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import platform
import re
import signal
import sys
from pathlib import Path
from typing import Any

import uvloop

from .context import DEFAULTS, Context, Knobs
from .procs import cpu_list
from .progress import Progress
from .spawn import KINDS, Environment, SpawnOptions
from .targets import UsageError, mask_passwords, parse_number, parse_target

SESSION_SCENARIOS = ("burst", "churn", "leak", "external", "restart")
MEASUREMENTS = ("pgbench", "relay", "waiters", "handoff", "instructions")
ALIASES = {"incidents": SESSION_SCENARIOS, "measure": MEASUREMENTS}
EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest",
        description="Compare PostgreSQL targets side by side under scenarios that exhaust connection "
                    "slots, and measure slotproxy against the direct connection and PgBouncer.",
        epilog="Scenarios: burst churn leak external restart (or 'incidents' for all five); measurements: "
               "pgbench relay waiters handoff instructions (or 'measure' for all five).")
    p.add_argument("scenarios", nargs="+", metavar="SCENARIO",
                   choices=[*SESSION_SCENARIOS, *MEASUREMENTS, *ALIASES])
    where = p.add_argument_group("targets (the first is the reference for ratios)")
    where.add_argument("--target", action="append", default=[], metavar="NAME=DSN",
                       help="a postgresql:// URI to test; repeat for several")
    where.add_argument("--server", metavar="DSN",
                       help="the server itself, bypassing every proxy (for `external`)")
    where.add_argument("--pid", action="append", default=[], metavar="NAME=PID",
                       help="the process behind a target, for its CPU time and memory")
    where.add_argument("--slots", action="append", default=[], metavar="NAME=N",
                       help="server sessions a proxy target opens at most (for `waiters`)")
    spawn = p.add_argument_group("--spawn: a throwaway server, slotproxy and PgBouncer (session mode)")
    spawn.add_argument("--spawn", action="store_true", help="start the targets; stop them afterwards")
    spawn.add_argument("--spawn-targets", metavar="LIST", default=None,
                       help=f"which, in this order (default {','.join(KINDS)}; PgBouncer only if installed; "
                            "add forwarder, a bare uvloop forwarder, for the floor of a transport relay "
                            "in pgbench and relay; add pgbouncer-unpooled, PgBouncer opening a server "
                            "session per client as slotproxy does, the peer for pgbench -C)")
    spawn.add_argument("--max-connections", type=int, help="the server's (default 20)")
    spawn.add_argument("--reserved", type=int,
                       help="its superuser_reserved_connections (default 3)")
    spawn.add_argument("--proxy-slots", type=int, default=None,
                       help="slotproxy's max_backend_slots and PgBouncer's pool size "
                            "(default max-connections - reserved)")
    spawn.add_argument("--server-socket", action="store_true",
                       help="slotproxy and PgBouncer reach the server over its Unix socket, "
                            "as on the database host (direct clients keep TCP)")
    spawn.add_argument("--proxy-cpus", metavar="LIST",
                       help="run the proxies on these CPUs (such as 1, or 2-3) and the server, pgbench and "
                            "the harness on the others, so that no proxy takes CPU from the server (Linux)")
    spawn.add_argument("--queue-timeout", type=float,
                       help="slotproxy's queue_timeout, PgBouncer's query_wait_timeout (default 30)")
    k = Knobs()
    c = p.add_argument_group("a client's session (burst, churn, leak, external, restart)")
    holds = ", ".join(f"{s} {d['hold']:g}" for s, d in DEFAULTS.items())
    rates = ", ".join(f"{s} {d['rate']:g}" for s, d in DEFAULTS.items() if "rate" in d)
    c.add_argument("--hold", type=float,
                   help=f"seconds each client keeps its session, at least one query ({holds})")
    c.add_argument("--query", default=k.query, help=f"what clients run (default {k.query!r})")
    c.add_argument("--think", type=float, default=k.think, help=f"seconds between queries ({k.think:g})")
    c.add_argument("--connect-timeout", type=float,
                   help="client connect timeout, and each query's (default: spawn queue timeout + 10, "
                        "else 60)")
    c.add_argument("--clients", type=int, default=k.clients, help=f"burst: clients at once ({k.clients})")
    c.add_argument("--rate", type=float, help=f"clients arriving per second, Poisson ({rates})")
    c.add_argument("--duration", type=float, default=k.duration,
                   help=f"seconds of arrivals ({k.duration:g})")
    c.add_argument("--seed", type=int, default=k.seed, help="arrival schedule, the same for every target")
    c.add_argument("--leaked", type=int, default=k.leaked, help=f"leak: sessions never closed ({k.leaked})")
    c.add_argument("--external", type=int, default=k.external,
                   help=f"external: connections that bypass the proxy ({k.external})")
    c.add_argument("--external-at", type=float, help="external: when they come (default duration/3)")
    c.add_argument("--external-for", type=float, help="external: how long they stay (default duration/3)")
    c.add_argument("--restart-at", type=float, help="restart: when (default duration/3)")
    c.add_argument("--restart-command", metavar="CMD",
                   help="restart: a shell command that restarts your server (spawn: pg_ctl restart); "
                        "send the server's output to a file (pg_ctl -l FILE): the harness keeps "
                        "what the command prints only until it exits")
    c.add_argument("--sample-interval", type=float, default=k.sample_interval,
                   help=f"timeline resolution in seconds ({k.sample_interval:g})")
    b = p.add_argument_group("pgbench (select-only, interleaved rounds A B C A B C ...)")
    b.add_argument("--pgbench-clients", type=int, default=k.pgbench_clients, help=f"-c ({k.pgbench_clients})")
    b.add_argument("--pgbench-jobs", type=int, default=k.pgbench_jobs, help=f"-j ({k.pgbench_jobs})")
    b.add_argument("--pgbench-seconds", type=int, default=k.pgbench_seconds,
                   help=f"-T per run ({k.pgbench_seconds})")
    b.add_argument("--pgbench-scale", type=int, default=k.pgbench_scale, help="-s for -i (1)")
    b.add_argument("--pgbench-init", action="store_true",
                   help="run pgbench -i through the first target first (spawn does it anyway)")
    b.add_argument("--protocols", default="simple,extended", help="-M modes (simple,extended)")
    b.add_argument("--reconnect", default="no,yes",
                   help="without and/or with -C, a new connection per transaction (no,yes)")
    b.add_argument("--rounds", type=int, default=k.rounds, help=f"rounds, for pgbench and relay ({k.rounds})")
    m = p.add_argument_group("measurements")
    m.add_argument("--relay-mb", type=int, default=k.relay_mb,
                   help=f"relay: result size in MiB ({k.relay_mb})")
    m.add_argument("--waiters", type=int, default=k.waiters,
                   help=f"waiters: clients left waiting, for the proxy's memory ({k.waiters})")
    m.add_argument("--handoffs", type=int, default=k.handoffs, help=f"handoff: samples ({k.handoffs})")
    m.add_argument("--instr-connections", type=int, default=k.instr_connections,
                   help=f"instructions: connections counted ({k.instr_connections})")
    m.add_argument("--instr-transactions", type=int, default=k.instr_transactions,
                   help=f"instructions: transactions counted ({k.instr_transactions})")
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", type=Path,
                     help="where to write every figure (default loadtest-results/run-TIME.json)")
    out.add_argument("--png-dir", metavar="DIR", type=Path,
                     help="where to write the PNG timelines (default beside the JSON file)")
    out.add_argument("--no-png", action="store_true", help="skip the PNG timelines")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    return p


# Options of --spawn, and their defaults there; with --target they would change nothing.
SPAWN_ONLY = {"spawn_targets": None, "max_connections": 20, "reserved": 3, "proxy_slots": None,
              "server_socket": False, "proxy_cpus": None, "queue_timeout": 30.0}


def spawn_defaults(args: argparse.Namespace) -> None:
    """Refuse a --spawn option given without --spawn; else fill in the defaults of those not given."""
    for flag, default in SPAWN_ONLY.items():
        value = getattr(args, flag)
        if value is None or value is False:
            setattr(args, flag, default)
        elif not args.spawn:
            raise UsageError(f"--{flag.replace('_', '-')}: only with --spawn (it sets up what the "
                             "harness starts; your own targets are as you set them up)")


def knobs_from(args: argparse.Namespace) -> Knobs:
    def modes(text: str, allowed: dict[str, Any], flag: str) -> list[Any]:
        found = []
        for word in filter(None, (w.strip() for w in text.split(","))):
            if word not in allowed:
                raise UsageError(f"{flag}: {word!r} is not one of {', '.join(allowed)}")
            found.append(allowed[word])
        if not found:
            raise UsageError(f"{flag}: give at least one of {', '.join(allowed)}")
        return found

    for flag in ("clients", "rounds", "waiters", "handoffs", "pgbench_clients", "pgbench_jobs",
                 "pgbench_seconds", "relay_mb", "max_connections"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')}: must be at least 1")
    for flag, least in (("instr_connections", 2), ("instr_transactions", 4)):
        if getattr(args, flag) < least:
            raise UsageError(f"--{flag.replace('_', '-')}: must be at least {least}")
    for flag in ("rate", "duration", "sample_interval", "queue_timeout", "connect_timeout"):
        value = getattr(args, flag)
        if value is not None and value <= 0:
            raise UsageError(f"--{flag.replace('_', '-')}: must be above 0")
    if args.reserved < 1:  # the harness's own checks log in as the superuser, on a reserved slot
        raise UsageError("--reserved: must be at least 1")
    if args.proxy_slots is not None and args.proxy_slots < 1:
        raise UsageError("--proxy-slots: must be at least 1")
    if args.reserved >= args.max_connections:
        raise UsageError("--reserved: must be below --max-connections")
    for flag in ("hold", "think", "leaked", "external"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise UsageError(f"--{flag.replace('_', '-')}: must not be negative")
    return Knobs(
        hold=args.hold, query=args.query, think=args.think, connect_timeout=args.connect_timeout,
        clients=args.clients, rate=args.rate, duration=args.duration, seed=args.seed, leaked=args.leaked,
        external=args.external, external_at=args.external_at, external_for=args.external_for,
        restart_at=args.restart_at, restart_command=args.restart_command,
        sample_interval=args.sample_interval, pgbench_clients=args.pgbench_clients,
        pgbench_jobs=args.pgbench_jobs, pgbench_seconds=args.pgbench_seconds,
        pgbench_scale=args.pgbench_scale, pgbench_init=args.pgbench_init,
        protocols=modes(args.protocols, {"simple": "simple", "extended": "extended",
                                         "prepared": "prepared"}, "--protocols"),
        reconnect=modes(args.reconnect, {"no": False, "yes": True}, "--reconnect"),
        rounds=args.rounds, relay_mb=args.relay_mb, waiters=args.waiters, handoffs=args.handoffs,
        instr_connections=args.instr_connections, instr_transactions=args.instr_transactions)


def expand(names: list[str]) -> list[str]:
    found: list[str] = []
    for n in names:
        for s in ALIASES.get(n, (n,)):
            if s not in found:
                found.append(s)
    return found


def spawn_options(args: argparse.Namespace) -> SpawnOptions:
    kinds = tuple(w.strip() for w in (args.spawn_targets or ",".join(KINDS)).split(",") if w.strip())
    cpus = parse_cpus(args.proxy_cpus) if args.proxy_cpus is not None else frozenset()
    return SpawnOptions(max_connections=args.max_connections, reserved=args.reserved,
                        proxy_slots=args.proxy_slots, queue_timeout=args.queue_timeout,
                        kinds=kinds, kinds_given=args.spawn_targets is not None,
                        server_socket=args.server_socket,
                        proxy_cpus=cpus)


def parse_cpus(text: str) -> frozenset[int]:
    """--proxy-cpus: CPU numbers and ranges (1,3 or 2-3), each available to us, not all of them."""
    if not hasattr(os, "sched_setaffinity"):
        raise UsageError("--proxy-cpus: this platform does not let a process choose its CPUs")
    available = os.sched_getaffinity(0)
    cpus: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part.strip(), re.ASCII)
        if m is None:
            raise UsageError(f"--proxy-cpus {text!r}: expected CPU numbers such as 1, 2-3 or 1,3")
        first, last = int(m[1]), int(m[2] or m[1])
        if first > last:
            raise UsageError(f"--proxy-cpus {text!r}: the range {part.strip()} runs backwards")
        if last > max(available):  # checked before a range is spelled out: 0-99999999999
            raise UsageError(f"--proxy-cpus: CPU {last} is not available to this process "
                             f"(it may use {cpu_list(available)})")
        cpus.update(range(first, last + 1))
    if not cpus <= available:
        raise UsageError(f"--proxy-cpus: CPU {cpu_list(cpus - available)} is not available to this "
                         f"process (it may use {cpu_list(available)})")
    if cpus == available:
        raise UsageError(f"--proxy-cpus: leaves no CPU for the server and pgbench (this process may "
                         f"use {cpu_list(available)})")
    return frozenset(cpus)


async def run(scenarios: list[str], ctx: Context, sections: list[dict[str, Any]]) -> None:
    """Run each scenario against every target; add their JSON sections to `sections` as they end."""
    from . import callgrind, measure, pgbench
    from .scenarios import run_sessions

    for name in scenarios:
        if name in SESSION_SCENARIOS:
            section = await run_sessions(name, ctx)
        elif name == "pgbench":
            section = await pgbench.run(ctx)
        elif name == "instructions":
            section = await callgrind.instructions(ctx)
        else:
            section = await getattr(measure, name)(ctx)
        sections.append(section)


def document(started: datetime.datetime, ctx: Context, sections: list[dict[str, Any]],
             spawned: dict[str, Any] | None, notes: list[str]) -> dict[str, Any]:
    return {
        "harness": "slotproxy loadtest",
        "started": started.isoformat(timespec="seconds"),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "command": [mask_passwords(a) for a in sys.argv[1:]],
        "spawned": spawned,
        "targets": [{"name": t.name, "dsn": t.shown(), "kind": t.kind, "pid": t.pid} for t in ctx.targets],
        "notes": notes,
        "scenarios": sections,
    }


async def main_async(args: argparse.Namespace) -> int:
    from . import plot
    from .report import render, write_json

    scenarios = expand(args.scenarios)
    spawn_defaults(args)
    knobs = knobs_from(args)
    progress = Progress(enabled=not args.quiet)
    given = [parse_target(t) for t in args.target]
    if args.spawn == bool(given):
        raise UsageError("give either --spawn or at least one --target NAME=DSN")
    if len({t.name for t in given}) != len(given):
        raise UsageError("--target: names must differ")
    pids = dict(parse_number(p, "--pid") for p in args.pid)
    slots = dict(parse_number(s, "--slots") for s in args.slots)
    given = [t if t.name not in pids else type(t)(t.name, t.dsn, t.kind, pids[t.name]) for t in given]
    stem = datetime.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    claimed: list[Path] = [args.json] if args.json else []

    def json_path() -> Path:
        """--json, or a file of this run's own in loadtest-results/, claimed at the first write."""
        if not claimed:
            claimed.append(new_file(Path("loadtest-results"), stem, ".json"))
        return claimed[0]

    started = datetime.datetime.now(datetime.UTC)

    async def go(ctx: Context, spawned: dict[str, Any] | None, notes: list[str]) -> int:
        for name in scenarios:
            ctx.require(name)
        for name in pids.keys() | slots.keys():
            if name not in {t.name for t in ctx.targets}:
                raise UsageError(f"--pid/--slots {name}: no target has that name")
        for n in notes:
            progress.note(f"note: {n}")
        progress.note("targets: " + ", ".join(f"{t.name} = {t.shown()}" for t in ctx.targets))
        sections: list[dict[str, Any]] = []
        try:
            await run(scenarios, ctx, sections)
        except BaseException as e:
            if sections:  # what finished is kept
                for section in sections:
                    print("\n" + render(section), flush=True)
                doc = document(started, ctx, sections, spawned, notes)
                why = ("interrupted" if isinstance(e, (asyncio.CancelledError, KeyboardInterrupt))
                       else f"{type(e).__name__}: {e}")
                doc["incomplete"] = f"{len(sections)} of {len(scenarios)} finished; then {why}"
                write_json(json_path(), doc)
                print(f"loadtest: the figures of the {len(sections)} that finished: {json_path()}",
                      file=sys.stderr)
            raise
        doc = document(started, ctx, sections, spawned, notes)
        for section in sections:
            print("\n" + render(section), flush=True)
        write_json(json_path(), doc)  # first: a failure drawing the pictures loses no figure
        if not args.no_png and any(s["kind"] == "sessions" for s in sections):
            written, why_not = plot.write(sections, args.png_dir or json_path().parent, json_path().stem)
            doc["png"] = [str(p) for p in written]
            write_json(json_path(), doc)
            print("\n" + (f"PNG timelines: {', '.join(str(p) for p in written)}" if written else why_not))
        print(f"Every figure: {json_path()}")
        failed = sum(section.get("failed_runs", 0) for section in sections)
        if failed:  # its figures are missing runs: not a measurement to quote
            print(f"loadtest: {failed} pgbench runs failed (see 'Runs that failed')", file=sys.stderr)
            return EXIT_FAILED
        return EXIT_OK

    if args.spawn:
        async with Environment(spawn_options(args)) as env:
            return await go(Context.spawned(env, knobs, progress), env.describe(), env.notes)
    ctx = Context(given, knobs, progress, server_dsn=args.server, slots=slots)
    notes: list[str] = []
    if len(given) > 1:
        notes.append("nothing is reset between your targets: server sessions one keeps open (a pooling "
                     "PgBouncer keeps them up to its server_idle_timeout) take slots from the next")
    return await go(ctx, None, notes)


def new_file(directory: Path, stem: str, suffix: str) -> Path:
    """directory/stem+suffix, made empty; stem-2, stem-3, ... when taken (runs started in the
    same second)."""
    directory.mkdir(parents=True, exist_ok=True)
    n = 1
    while True:
        path = directory / f"{stem}{'' if n == 1 else f'-{n}'}{suffix}"
        try:
            path.open("x").close()
            return path
        except FileExistsError:
            n += 1


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return uvloop.run(_guarded(args))
    except UsageError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("\nloadtest: interrupted; everything it started is stopped", file=sys.stderr)
        return EXIT_FAILED
    except BrokenPipeError:
        sys.stderr.close()
        return EXIT_OK
    except RuntimeError as e:
        print(f"loadtest: {e}", file=sys.stderr)
        return EXIT_FAILED


async def _guarded(args: argparse.Namespace) -> int:
    """main_async, cancelled by SIGTERM as by Ctrl-C, so that cleanup runs either way."""
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    return await main_async(args)

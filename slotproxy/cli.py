"""Command line: argparse, logging, uvloop, signals, exit codes. The only place that exits.

Exit codes: 0 done, 1 could not run (cannot listen, demo failed, status unreachable),
2 bad usage or configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from typing import Any

import uvloop

from . import __version__, config, logs, workers
from .errors import ConfigError

logger = logging.getLogger("slotproxy")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="slotproxy",
        description="Hold PostgreSQL clients in a queue at the connection-slot limit.")
    parser.add_argument("--version", action="version", version=f"slotproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run the proxy")
    run.add_argument("--config", metavar="FILE", help="TOML configuration file")
    run.add_argument("--listen", metavar="HOST:PORT", help="overrides proxy.listen")
    run.add_argument("--backend", metavar="HOST:PORT",
                     help="overrides backend.host and backend.port (/SOCKET/DIR:PORT: a Unix socket)")
    run.add_argument("--max-backend-slots", type=_slots_flag, metavar="N|auto",
                     help="overrides admission.max_backend_slots")
    run.add_argument("--max-queue", type=int, metavar="N", help="overrides admission.max_queue")
    run.add_argument("--queue-timeout", type=float, metavar="S",
                     help="overrides admission.queue_timeout")
    _logging_args(run)
    run.add_argument("--log-format", default="text", choices=["text", "json"],
                     help="text (default) or one JSON object per line for log shippers")

    status = sub.add_parser("status", help="who waits and who holds slots, from a running proxy")
    where = status.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="find the admin endpoints in [admin] listen")
    where.add_argument("--admin", metavar="HOST:PORT", help="the admin endpoints' address")
    status.add_argument("--json", action="store_true", help="the raw JSON of /status")
    status.add_argument("--watch", nargs="?", type=float, const=2.0, metavar="S",
                        help="refresh every S seconds (default 2) until Ctrl-C")

    health = sub.add_parser("health", help="exit 0 if the proxy's /health answers (container probes)")
    where = health.add_mutually_exclusive_group()
    where.add_argument("--config", metavar="FILE", help="find the admin endpoints in [admin] listen")
    where.add_argument("--admin", metavar="HOST:PORT", help="the admin endpoints' address")

    hashing = sub.add_parser("hash-password",
                             help="make a SCRAM-SHA-256 verifier for [admin] users (no password is stored)")
    hashing.add_argument("--iterations", type=int, default=4096, help="default 4096, as PostgreSQL")

    check = sub.add_parser("check-config", help="validate a configuration file and show its values")
    check.add_argument("file", metavar="FILE")

    demo = sub.add_parser(
        "demo", help="start a throwaway PostgreSQL and show a burst of clients with and without the proxy")
    demo.add_argument("--clients", type=int, default=100, help="clients in the burst (default 100)")
    demo.add_argument("--max-connections", type=int, default=10,
                      help="the throwaway server's max_connections (default 10)")
    demo.add_argument("--hold", type=float, default=0.5,
                      help="seconds each client keeps its session (default 0.5)")
    _logging_args(demo, default="warning")
    return parser


def _slots_flag(text: str) -> int | str:
    if text == config.AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or \"auto\", got {text!r}") from None


def _logging_args(parser: argparse.ArgumentParser, default: str = "info") -> None:
    parser.add_argument("--log-level", default=default,
                        choices=["debug", "info", "warning", "error"], help=f"default {default}")


def _overrides(args: argparse.Namespace) -> list[config.Override]:
    found: list[config.Override] = []
    if args.listen is not None:
        found.append(("--listen", "proxy.listen", args.listen))
    if args.backend is not None:
        try:
            address = config.parse_server_address(args.backend)
        except ValueError as e:
            raise ConfigError("--backend", None, str(e)) from None
        found += [("--backend", "backend.host", address.host), ("--backend", "backend.port", address.port)]
    for flag, key in (("max_backend_slots", "admission.max_backend_slots"),
                      ("max_queue", "admission.max_queue"),
                      ("queue_timeout", "admission.queue_timeout")):
        value = getattr(args, flag)
        if value is not None:
            found.append(("--" + flag.replace("_", "-"), key, value))
    return found


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = _parser().parse_args(argv)
    try:
        if args.command == "check-config":
            return _check_config(args.file)
        if args.command == "run":
            return _run(args, argv)
        if args.command == "status":
            from .statuscli import show

            return show(args.config, args.admin, args.json, args.watch)
        if args.command == "health":
            from .statuscli import health

            return health(args.config, args.admin)
        if args.command == "hash-password":
            return _hash_password(args.iterations)
        if args.command == "demo":
            from .demo import run_demo

            logs.setup(args.log_level)
            return uvloop.run(run_demo(clients=args.clients, max_connections=args.max_connections,
                                       hold=args.hold))
    except ConfigError as e:
        print(f"slotproxy: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return EXIT_OK
    raise AssertionError(args.command)


def _run(args: argparse.Namespace, argv: list[str]) -> int:
    overrides = _overrides(args)
    cfg = config.load(args.config, overrides)
    me = workers.identity()
    if cfg.proxy.workers > 1 and me is None:
        logs.setup(args.log_level, args.log_format)
        return uvloop.run(workers.supervise(argv, cfg.proxy.workers))
    transform = None
    if me is not None:
        index, count = me
        transform = lambda c: workers.worker_config(c, index, count)  # noqa: E731
        cfg = transform(cfg)
    logs.setup(args.log_level, args.log_format, worker=None if me is None else me[0])
    return uvloop.run(_serve(cfg, args.config, overrides, transform))


def _hash_password(iterations: int) -> int:
    import getpass

    from .scram import Verifier

    if sys.stdin.isatty():
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            print("slotproxy: the passwords differ", file=sys.stderr)
            return EXIT_USAGE
    else:
        password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("slotproxy: an empty password", file=sys.stderr)
        return EXIT_USAGE
    print(Verifier.make(password, iterations))
    return EXIT_OK


def _check_config(path: str) -> int:
    cfg = config.load(path)
    print(f"{path}: OK")
    for key, value, changed in config.describe(cfg):
        print(f"  {key} = {value}{'' if changed else '  (default)'}")
    for warning in config.warnings(cfg):
        print(f"warning: {warning}")
    return EXIT_OK


def _raise_descriptor_limit(cfg: config.Config) -> None:
    """Up to the hard limit, as a server with many sockets should; warn if still short."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    needed = 2 * cfg.proxy.max_clients + 64  # a client and its server each, and some to spare
    if soft < needed:
        logger.warning("file descriptor limit %d, but proxy.max_clients = %d may need %d: raise the "
                       "limit (ulimit -n) or lower proxy.max_clients", soft, cfg.proxy.max_clients, needed)


async def _serve(cfg: config.Config, path: str | None, overrides: list[config.Override],
                 transform: Any) -> int:
    from .server import CannotListen, Proxy

    _raise_descriptor_limit(cfg)
    loop = asyncio.get_running_loop()
    proxy = Proxy(cfg, path=path, overrides=overrides, reuse_port=cfg.proxy.workers > 1,
                  transform=transform)
    channel = None
    fd = os.environ.get(workers.CONTROL_FD_ENV)
    if fd is not None:
        channel = workers.ControlChannel(int(fd), proxy.apply)
        await channel.start()
        proxy.broadcast = channel.send
    try:
        await proxy.start()
    except CannotListen as e:
        logger.error("%s", e)
        if channel is not None:
            await channel.close()
        return EXIT_FAILED
    stopped = asyncio.Event()
    signals_seen = 0
    tasks: set[asyncio.Task[Any]] = set()

    def stop(how: Any) -> None:
        task = loop.create_task(how())
        tasks.add(task)
        task.add_done_callback(lambda _: stopped.set())

    def on_signal(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        name = signal.Signals(signum).name
        if signals_seen == 1:
            logger.info("%s received: shutting down gracefully (again to close at once)", name)
            stop(proxy.shutdown)
        else:
            logger.warning("%s received again: closing every session now", name)
            stop(proxy.abort)

    async def reload() -> None:
        try:
            await proxy.apply("reload")
        except ConfigError as e:
            logger.error("reload failed, the running configuration stays: %s", e)

    def on_hangup() -> None:
        task = loop.create_task(reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def supervisor_lost() -> None:
        nonlocal signals_seen
        if signals_seen == 0:
            signals_seen = 1  # as a first signal: a SIGTERM after it closes at once
            logger.warning("the supervisor is gone: shutting down gracefully")
            stop(proxy.shutdown)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    if channel is not None:
        channel.when_lost(supervisor_lost)
    await stopped.wait()
    if channel is not None:
        await channel.close()
    logger.info("stopped")
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())

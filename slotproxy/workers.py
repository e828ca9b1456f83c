"""proxy.workers = N: N processes share the listen port (SO_REUSEPORT).

`slotproxy run` with workers > 1 becomes a supervisor: it starts N workers,
each the same command with SLOTPROXY_WORKER=i/N in its environment and one
end of a socketpair for control messages. It forwards SIGTERM, SIGINT and
SIGHUP to every worker, restarts a worker that dies (giving up if they die
right after starting), and relays console commands (PAUSE, RESUME, RELOAD)
from the worker that got them to the others.

The budget: with a monitor, every worker admits by what the server has free
and sees the others as peers; without one, each worker takes a fixed share of
admission.max_backend_slots. Queue limits and class slots are always shared
out. A worker's admin endpoints listen on admin.listen's port plus its index.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable

from .config import Address, Config, check_shares

logger = logging.getLogger("slotproxy.workers")

WORKER_ENV = "SLOTPROXY_WORKER"  # "index/count"
CONTROL_FD_ENV = "SLOTPROXY_CONTROL_FD"
QUICK_DEATH = 5.0  # a worker that dies sooner than this after starting counts as failing
MAX_QUICK_DEATHS = 3


def identity() -> tuple[int, int] | None:
    """(index, count) in a worker process, else None."""
    value = os.environ.get(WORKER_ENV)
    if not value:
        return None
    index, _, count = value.partition("/")
    return int(index), int(count)


def share(total: int, index: int, count: int) -> int:
    return total // count + (1 if index < total % count else 0)


def worker_config(config: Config, index: int, count: int) -> Config:
    """Worker `index`'s part of the proxy's limits, and its admin port.

    Queue limits and class shares are the whole proxy's, so each worker takes
    its share; the server budget too, unless a monitor lets every worker see
    what the server has free.
    """
    check_shares(config, count, config.source, running=True)  # a reload may lower them
    admission = config.admission

    def part(total: int) -> int:
        return share(total, index, count)

    classes = tuple(dataclasses.replace(
        c, min_slots=part(c.min_slots), max_queue=part(c.max_queue),
        max_slots=None if c.max_slots is None else part(c.max_slots))
        for c in admission.classes)
    admission = dataclasses.replace(admission, max_queue=part(admission.max_queue), classes=classes)
    if not config.monitor.dsn and admission.fixed_slots is not None:
        admission = dataclasses.replace(admission, max_backend_slots=part(admission.fixed_slots))
    admin = config.admin
    if admin.listen is not None and admin.listen.port:
        admin = dataclasses.replace(admin, listen=Address(admin.listen.host, admin.listen.port + index))
    return dataclasses.replace(config, admission=admission, admin=admin)


def _encode(command: str, args: tuple[str, ...]) -> bytes:
    return json.dumps({"command": command, "args": list(args)}).encode() + b"\n"


class ControlChannel:
    """A worker's line to its supervisor.

    Its end (EOF) means the supervisor is gone, killed or crashed: a worker left
    on its own would keep its share of the server's slots on top of what a new
    supervisor's workers take, so it stops (see `when_lost`).
    """

    def __init__(self, fd: int, apply: Callable[..., Awaitable[object]]) -> None:
        self.fd = fd
        self.apply = apply
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._lost = False
        self._on_lost: Callable[[], None] | None = None

    async def start(self) -> None:
        reader, self._writer = await asyncio.open_connection(sock=socket.socket(fileno=self.fd))
        self._task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            async for line in reader:
                try:
                    message = json.loads(line)
                    await self.apply(message["command"], *message["args"])
                except Exception as e:  # a bad reload is logged by the proxy; keep listening
                    logger.warning("control command %r failed here: %s", line.strip(), e)
        except OSError as e:  # a supervisor killed with our message unread: a reset, not EOF
            logger.warning("control channel to the supervisor: %s", e.strerror or e)
        self._lost = True
        if self._on_lost is not None:
            self._on_lost()

    def when_lost(self, callback: Callable[[], None]) -> None:
        """Call `callback` once the supervisor is gone (at once if it is already)."""
        self._on_lost = callback
        if self._lost:
            callback()

    def send(self, command: str, args: tuple[str, ...]) -> None:
        if self._writer is not None:
            self._writer.write(_encode(command, args))

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._writer is not None:
            self._writer.close()


class _Worker:
    def __init__(self, index: int) -> None:
        self.index = index
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.started_at = 0.0


async def supervise(argv: list[str], count: int) -> int:
    """Run `count` workers of `slotproxy <argv>` until a signal stops them all."""
    loop = asyncio.get_running_loop()
    workers = [_Worker(i) for i in range(count)]
    stopping = False
    signals = 0
    quick_deaths = 0
    done = asyncio.Event()
    tasks: set[asyncio.Task[None]] = set()
    # PAUSE and RESUME lines since admission was last resumed everywhere: a
    # restarted worker replays them to pause what the others have paused.
    pauses: list[bytes] = []

    def spawn(coro: Awaitable[None]) -> None:
        task = loop.create_task(coro)  # type: ignore[arg-type]
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async def start(worker: _Worker) -> None:
        parent, child = socket.socketpair()
        env = {**os.environ, WORKER_ENV: f"{worker.index}/{count}", CONTROL_FD_ENV: str(child.fileno())}
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "slotproxy", *argv, env=env, pass_fds=(child.fileno(),))
        child.close()
        worker.started_at = loop.time()
        reader, worker.writer = await asyncio.open_connection(sock=parent)
        logger.info("worker %d started (pid %d)", worker.index, worker.process.pid)
        spawn(relay(worker, reader))
        spawn(watch(worker, worker.process))
        if stopping:  # the signal came while it was starting: it did not get it
            worker.process.send_signal(signal.SIGTERM)
        for line in pauses:
            worker.writer.write(line)

    async def relay(worker: _Worker, reader: asyncio.StreamReader) -> None:
        async for line in reader:  # a console command one worker ran: the others run it too
            command = json.loads(line)
            if command["command"] == "resume" and not command["args"]:
                pauses.clear()
            elif command["command"] in ("pause", "resume"):
                pauses.append(line)
            for other in workers:
                if other is not worker and other.writer is not None:
                    other.writer.write(line)

    def all_exited() -> bool:
        return all(w.process is None or w.process.returncode is not None for w in workers)

    async def watch(worker: _Worker, process: asyncio.subprocess.Process) -> None:
        nonlocal quick_deaths, stopping
        code = await process.wait()
        if worker.process is not process:
            return
        worker.writer = None
        if stopping:
            if all_exited():
                done.set()
            return
        if loop.time() - worker.started_at < QUICK_DEATH:
            quick_deaths += 1
        else:
            quick_deaths = 0  # it served a while: a crash now is not a failing start
        logger.error("worker %d (pid %d) exited with %d", worker.index, process.pid, code)
        if quick_deaths >= MAX_QUICK_DEATHS:
            logger.error("workers keep dying right after starting: stopping")
            stopping = True
            forward(signal.SIGTERM)
            if all_exited():
                done.set()
            return
        await asyncio.sleep(1.0)  # no restart storm
        if stopping:  # a signal came meanwhile; the others may all be gone already
            if all_exited():
                done.set()
            return
        await start(worker)

    def forward(signum: int) -> None:
        for worker in workers:
            if worker.process is not None and worker.process.returncode is None:
                worker.process.send_signal(signum)

    def on_signal(signum: int) -> None:
        nonlocal stopping, signals
        if signum == signal.SIGHUP:
            logger.info("SIGHUP received: every worker reloads")
        else:
            stopping = True
            signals += 1
            logger.info("%s received: stopping the workers%s", signal.Signals(signum).name,
                        " at once" if signals > 1 else "")
        forward(signum)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(signum, on_signal, signum)
    for worker in workers:
        await start(worker)
    await done.wait()
    # A worker signalled before it could set up its handlers ends by SIGTERM itself.
    codes = [w.process.returncode for w in workers if w.process is not None]
    failed = any(code not in (0, -signal.SIGTERM) for code in codes)
    return 0 if quick_deaths < MAX_QUICK_DEATHS and not failed else 1

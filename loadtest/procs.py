"""Processes the harness starts (slotproxy, PgBouncer) and what it reads about them from /proc.

slotproxy runs as a subprocess (`python -m slotproxy run`) so that it has
an event loop and a CPU of its own, as in production, and does not share
the clients' loop. Every process started here is stopped by `stop()`,
which the callers run in `finally`. Children get a session of their own, so
a Ctrl-C in the terminal reaches only the harness, which then stops them
in order.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import resource
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO, Self

from .targets import UsageError

CLK_TCK = os.sysconf("SC_CLK_TCK")


def scratch_dir(prefix: str) -> Path:
    """A temporary directory that the postgres user can enter (PgBouncer runs as it when we are root)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(0o755)
    return path


def _log_file(path: Path) -> BinaryIO:
    return open(path, "wb")  # the caller closes it


def raise_fd_limit() -> int:
    """Raise RLIMIT_NOFILE to its hard limit (children inherit it); return the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def set_cpus(pid: int, cpus: Iterable[int]) -> None:
    """Put every thread of process `pid` on `cpus`; threads and children made later inherit it.

    os.sched_setaffinity moves one thread; a process may have several already.
    """
    cpus = set(cpus)
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return  # it has exited: whoever waits for it will see that
    for task in tasks:
        try:
            os.sched_setaffinity(int(task), cpus)
        except ProcessLookupError:
            pass  # that thread has ended meanwhile


def cpu_list(cpus: frozenset[int] | set[int]) -> str:
    """1,3 or 0-3: as taskset and /proc print them."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def on_cpus(argv: Sequence[str], cpus: frozenset[int] | None) -> list[str]:
    """`argv` started on `cpus` (None: anywhere), by taskset: a process may always set its own
    affinity, where moving another user's (PgBouncer runs as postgres when we are root) needs
    CAP_SYS_NICE, which a container's root often lacks."""
    if not cpus:
        return list(argv)
    taskset = shutil.which("taskset")
    if taskset is None:
        raise UsageError("--proxy-cpus: placing the proxies needs taskset (util-linux)")
    return [taskset, "--cpu-list", cpu_list(cpus), *argv]


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far, from /proc/PID/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_cpu_seconds() -> tuple[float, float] | None:
    """CPU time every core of the machine has spent busy so far, from /proc/stat:
    (user, kernel), kernel counting interrupts. None where there is no /proc/stat."""
    try:
        with open("/proc/stat") as f:
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f.readline().split()[1:8])
    except (OSError, ValueError):
        return None
    return (user + nice) / CLK_TCK, (system + irq + softirq) / CLK_TCK


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, from /proc/PID/status (VmRSS)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def unread_sockets(port: int) -> tuple[int, int]:
    """(established, of which still holding unread bytes) TCP sockets whose local port is `port`.

    Seen from outside: a client's bytes that the process listening on `port`
    has read leave the receive queue of its socket. Linux only (/proc/net/tcp).
    """
    established = unread = 0
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            parts = line.split()
            if not parts[1].endswith(want) or parts[3] != "01":  # 01: ESTABLISHED
                continue
            established += 1
            if int(parts[4].split(":")[1], 16):
                unread += 1
    return established, unread


async def run_captured(argv: Sequence[str], timeout: float | None = None, *,
                       merge: bool = True) -> tuple[int, bytes, bytes]:
    """Run a command to its end: (exit status, stdout, stderr); with `merge`, stderr is in stdout.

    It is killed, with whatever it started in its process group, when it overruns `timeout`
    (a RuntimeError then) or when the caller is cancelled, so that no run is left behind. It
    gets a session of its own: a Ctrl-C in the terminal reaches only the harness. Its output
    goes to files, read once it has exited: a daemon it starts (the server `pg_ctl restart`
    starts again) may keep a copy of its stdout open, and a pipe would never end.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out if merge else err,
            start_new_session=True)
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            raise RuntimeError(f"{' '.join(argv)[:200]} did not finish within {timeout:g} s") from None
        finally:
            if proc.returncode is None:
                try:  # its whole process group: a shell's children too (pg_ctl's server has its own)
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                await proc.wait()
        assert proc.returncode is not None
        out.seek(0)
        err.seek(0)
        return proc.returncode, out.read(), err.read()


async def wait_for(predicate: Callable[[], object], what: str, timeout: float,
                   interval: float = 0.01) -> None:
    """Poll `predicate` until true; raise naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(interval)  # poll interval


class Child:
    """A subprocess whose output goes to a log file in `workdir`."""

    name = "process"

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.proc = proc
        self.log = log

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def _find_in_log(self, pattern: str) -> re.Match[str] | None:
        try:
            return re.search(pattern, self.log.read_text(errors="replace"))
        except OSError:
            return None

    async def _await_log(self, pattern: str, timeout: float = 20) -> re.Match[str]:
        found: list[re.Match[str]] = []

        def ready() -> bool:
            m = self._find_in_log(pattern)
            if m:
                found.append(m)
            return bool(m) or self.proc.returncode is not None

        try:
            await wait_for(ready, f"{self.name} to start", timeout, interval=0.02)
        except RuntimeError:
            tail = self.log_tail()
            raise RuntimeError(f"{self.name} did not start within {timeout:g} s:\n{tail}") from None
        if not found:
            raise RuntimeError(f"{self.name} exited with status {self.proc.returncode}:\n{self.log_tail()}")
        return found[0]

    async def stop(self, timeout: float = 5) -> None:
        """Ask it to stop (SIGTERM), ask again (slotproxy then closes every session), then kill."""
        try:
            for _ in range(2):
                if self.proc.returncode is not None:
                    return
                try:
                    self.proc.send_signal(signal.SIGTERM)
                except ProcessLookupError:
                    return
                try:
                    await asyncio.wait_for(self.proc.wait(), timeout)
                except TimeoutError:
                    continue
        finally:
            if self.proc.returncode is None:
                self.kill()
                await self.proc.wait()

    def kill(self) -> None:
        """SIGKILL now, without waiting: for when there is no time to ask."""
        if self.proc.returncode is None:
            try:
                self.proc.kill()
            except ProcessLookupError:
                pass


class _ListeningChild(Child):
    """A Python process of ours that logs "listening on 127.0.0.1:PORT" once it serves."""

    def __init__(self, proc: asyncio.subprocess.Process, log: Path) -> None:
        super().__init__(proc, log)
        self.port = 0

    @classmethod
    async def _launch(cls, argv: Sequence[str], log: Path, ready_timeout: float, name: str,
                      cpus: frozenset[int] | None) -> Self:
        with _log_file(log) as out:
            proc = await asyncio.create_subprocess_exec(
                *on_cpus(argv, cpus), stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                start_new_session=True)
        self = cls(proc, log)
        self.name = name
        try:
            m = await self._await_log(r"listening on 127\.0\.0\.1:(\d+)", ready_timeout)
        except BaseException:
            await self.stop()
            raise
        self.port = int(m.group(1))
        return self


class SlotproxyProcess(_ListeningChild):
    name = "slotproxy"

    @classmethod
    async def start(cls, workdir: Path, backend: tuple[str, int], *, slots: int, max_queue: int,
                    queue_timeout: float, name: str = "slotproxy", wrap: Sequence[str] = (),
                    ready_timeout: float = 20, cpus: frozenset[int] | None = None) -> SlotproxyProcess:
        """`wrap` goes before the command (a profiler, such as valgrind); `cpus`: where it runs."""
        config = workdir / f"{name}.toml"
        # Room for every client the queue may hold, as PgBouncer's max_client_conn gets.
        # Plain text to the server, as the direct target's sslmode=disable and PgBouncer here:
        # the default (prefer) would cost every connection an SSLRequest round trip. No line
        # per connection, as PgBouncer's log_connections = 0 below.
        config.write_text(f"[proxy]\nmax_clients = {max_queue + slots + 100}\nlog_connections = false\n"
                          "[backend]\nsslmode = \"disable\"\n")
        return await cls._launch(
            [*wrap, sys.executable, "-m", "slotproxy", "run", "--config", str(config),
             "--listen", "127.0.0.1:0",
             "--backend", f"{backend[0]}:{backend[1]}", "--max-backend-slots", str(slots),
             "--max-queue", str(max_queue), "--queue-timeout", str(queue_timeout)],
            workdir / f"{name}.log", ready_timeout, name, cpus)


class ForwarderProcess(_ListeningChild):
    """loadtest.forwarder: a bare uvloop forwarder, the floor of a relay on asyncio transports."""

    name = "forwarder"

    @classmethod
    async def start(cls, workdir: Path, backend: tuple[str, int], *, wrap: Sequence[str] = (),
                    ready_timeout: float = 20, cpus: frozenset[int] | None = None) -> ForwarderProcess:
        return await cls._launch(
            [*wrap, sys.executable, "-m", "loadtest.forwarder", "--backend", f"{backend[0]}:{backend[1]}"],
            workdir / "forwarder.log", ready_timeout, cls.name, cpus)


def server_account() -> pwd.struct_passwd | None:
    """PgBouncer refuses to run as root: run it as postgres then, as the clusters run."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise UsageError("running PgBouncer as root needs a 'postgres' user to run it as") from None


def pgbouncer_binary() -> str | None:
    return shutil.which("pgbouncer") or next(
        (p for p in ("/usr/sbin/pgbouncer", "/usr/local/bin/pgbouncer") if os.access(p, os.X_OK)), None)


class PgBouncerProcess(Child):
    name = "pgbouncer"

    def __init__(self, proc: asyncio.subprocess.Process, log: Path, port: int) -> None:
        super().__init__(proc, log)
        self.port = port
        self.bouncer_pid: int | None = None

    @classmethod
    async def start(cls, workdir: Path, backend: tuple[str, int], port: int, *, pool_size: int,
                    users: list[str], max_clients: int, query_wait_timeout: float,
                    unpooled: bool = False, wrap: Sequence[str] = (),
                    ready_timeout: float = 20, cpus: frozenset[int] | None = None) -> PgBouncerProcess:
        """`unpooled`: every client gets a server session of its own, closed when it leaves,
        as with slotproxy or a direct connection (server_lifetime = 0)."""
        binary = pgbouncer_binary()
        if binary is None:
            raise UsageError("pgbouncer is not installed (Debian: apt-get install pgbouncer)")
        account = server_account()
        home = workdir / ("pgbouncer-unpooled" if unpooled else "pgbouncer")
        home.mkdir(exist_ok=True)
        log = home / "pgbouncer.log"
        # auth_type=trust still wants every user listed in the auth_file.
        (home / "userlist.txt").write_text("".join(f'"{u}" ""\n' for u in users))
        (home / "pgbouncer.ini").write_text(f"""\
[databases]
* = host={backend[0]} port={backend[1]}

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = trust
auth_file = {home}/userlist.txt
logfile = {log}
pidfile = {home}/pgbouncer.pid
pool_mode = session
default_pool_size = {pool_size}
max_db_connections = {pool_size}
min_pool_size = 0
reserve_pool_size = 0
max_client_conn = {max_clients}
query_wait_timeout = {query_wait_timeout:g}
; slotproxy backs off from 50 ms to 1 s; PgBouncer's default is 15 s
server_login_retry = 1
server_tls_sslmode = disable
ignore_startup_parameters = extra_float_digits,options
log_connections = 0
log_disconnections = 0
admin_users = postgres
""" + ("; close a server session once its client leaves; nothing to reset then\n"
       "server_lifetime = 0\nserver_reset_query =\n" if unpooled else ""))
        if account is not None:
            for path in (home, *home.iterdir()):
                os.chown(path, account.pw_uid, account.pw_gid)
        argv = [*wrap, binary, str(home / "pgbouncer.ini")]
        if account is not None:
            # setpriv execs PgBouncer as postgres and keeps our raised RLIMIT_NOFILE; runuser
            # would pass through PAM, which resets it (to 1024 here), and stay as a parent.
            if shutil.which("setpriv"):
                argv = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                        "--clear-groups", "--", *argv]
            else:
                argv = ["runuser", "-u", account.pw_name, "--", *argv]
        argv = on_cpus(argv, cpus)  # before it changes user
        proc = await asyncio.create_subprocess_exec(
            *argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL, start_new_session=True)
        self = cls(proc, log, port)
        try:
            await self._await_log(rf"listening on (127\.0\.0\.1|[^ ]*):{port}", ready_timeout)
            # Its own pid (not runuser's), for its CPU time and memory; written after that line.
            pidfile = home / "pgbouncer.pid"
            await wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
                           "pgbouncer.pid", ready_timeout)
            self.bouncer_pid = int(pidfile.read_text().strip())
        except BaseException:
            await self.stop()
            raise
        return self

    @property
    def pid(self) -> int:
        return self.bouncer_pid

    async def stop(self, timeout: float = 5) -> None:
        await super().stop(timeout)
        pid = self.bouncer_pid
        # Only under runuser is PgBouncer not our child (with setpriv it is, and reaped by now).
        if pid is not None and pid != self.proc.pid and cpu_seconds(pid) is not None:
            os.kill(pid, signal.SIGKILL)  # runuser went, PgBouncer stayed: ours to end

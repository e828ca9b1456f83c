"""Throwaway PostgreSQL clusters: initdb + pg_ctl in a temporary directory.

Used by `slotproxy demo`, the load-test harness and the tests. initdb runs
once per `Template`; each `Cluster` is a copy of it (milliseconds) with its
own free port and settings. PostgreSQL refuses to run as root, so when we
are root the server runs as the `postgres` user on a directory it owns.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path

SUPERUSER = "postgres"

DEFAULT_HBA = """\
# TYPE  DATABASE  USER  ADDRESS  METHOD
host    all       all   127.0.0.1/32  {method}
host    all       all   ::1/128       {method}
host    replication all 127.0.0.1/32  {method}
local   all       all                 {method}
"""


class ClusterError(RuntimeError):
    pass


def find_bindir() -> Path:
    """The directory holding initdb and pg_ctl."""
    override = os.environ.get("SLOTPROXY_PG_BINDIR")
    candidates = [override] if override else []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    # Debian and Ubuntu keep the server binaries out of PATH.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: int(Path(p).parent.name) if Path(p).parent.name.isdigit() else 0,
                         reverse=True)
    pg_config = shutil.which("pg_config")
    if pg_config:
        out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True)
        if out.returncode == 0:
            candidates.append(out.stdout.strip())
    for c in candidates:
        if c and (Path(c) / "initdb").exists() and (Path(c) / "pg_ctl").exists():
            return Path(c)
    raise ClusterError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: install the server package "
        "(Debian: apt-get install postgresql) or set SLOTPROXY_PG_BINDIR")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run_as() -> pwd.struct_passwd | None:
    """The account to run the server as: postgres when we are root, else ourselves."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterError("running as root needs a 'postgres' user to run the server as") from None


def _chown_tree(path: Path, account: pwd.struct_passwd | None) -> None:
    if account is None:
        return
    os.chown(path, account.pw_uid, account.pw_gid)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.lchown(os.path.join(root, name), account.pw_uid, account.pw_gid)


class Template:
    """An initdb'd data directory to copy clusters from."""

    def __init__(self, base: Path | None = None, init_sql: str | None = None) -> None:
        self.bindir = find_bindir()
        self.account = _run_as()
        self.base = Path(base) if base else Path(tempfile.mkdtemp(prefix="slotproxy-pg-"))
        self._owns_base = base is None
        self.base.chmod(0o755)
        _chown_tree(self.base, self.account)
        self.datadir = self.base / "template"
        self._counter = 0
        self._run([str(self.bindir / "initdb"), "-D", str(self.datadir), "-U", SUPERUSER,
                   "--auth=trust", "--no-sync", "-E", "UTF8", "--locale=C"])
        if init_sql:
            # Single-user mode: no port, no socket; one statement per line.
            self._run([str(self.bindir / "postgres"), "--single", "-D", str(self.datadir), "postgres"],
                      input=init_sql.replace("\n", " ").replace(";", ";\n"))

    def _run(self, argv: list[str], *, timeout: float = 120,
             input: str | None = None) -> subprocess.CompletedProcess[str]:
        if self.account is not None:
            argv = ["runuser", "-u", self.account.pw_name, "--", *argv]
        result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                                input=input, stdin=None if input is not None else subprocess.DEVNULL)
        if result.returncode != 0 or "ERROR:" in result.stderr:
            raise ClusterError(f"{' '.join(argv)} failed ({result.returncode}):\n"
                               f"{result.stdout}{result.stderr}")
        return result

    def cluster(
        self,
        *,
        max_connections: int = 10,
        superuser_reserved_connections: int = 0,
        settings: Mapping[str, str | int] | None = None,
        hba: str | None = None,
        auth_method: str = "trust",
        files: Mapping[str, bytes] | None = None,
    ) -> Cluster:
        """A new cluster copied from this template (not started yet).

        `files` are written into its data directory (a TLS key and certificate,
        say), readable by the server's account alone.
        """
        self._counter += 1
        datadir = self.base / f"c{self._counter}"
        shutil.copytree(self.datadir, datadir, symlinks=True)
        for name, content in (files or {}).items():
            (datadir / name).write_bytes(content)
            (datadir / name).chmod(0o600)
        _chown_tree(datadir, self.account)
        datadir.chmod(0o700)
        return Cluster(self, datadir, max_connections=max_connections,
                       superuser_reserved_connections=superuser_reserved_connections,
                       settings=settings or {}, hba=hba or DEFAULT_HBA.format(method=auth_method))

    def remove(self) -> None:
        if self._owns_base:
            shutil.rmtree(self.base, ignore_errors=True)


class Cluster:
    """One throwaway PostgreSQL server on 127.0.0.1 and a free port, and on a Unix
    socket in its data directory (`socket_dir`)."""

    def __init__(self, template: Template, datadir: Path, *, max_connections: int,
                 superuser_reserved_connections: int, settings: Mapping[str, str | int],
                 hba: str) -> None:
        self.template = template
        self.datadir = datadir
        self.host = "127.0.0.1"
        self.port = free_port()
        self.socket_dir = str(datadir)
        self.logfile = datadir / "server.log"
        conf = {
            "listen_addresses": "'127.0.0.1'",
            "port": self.port,
            # The data directory: private to this cluster, and a short enough path.
            "unix_socket_directories": f"'{datadir}'",
            "max_connections": max_connections,
            "superuser_reserved_connections": superuser_reserved_connections,
            "fsync": "off",
            "synchronous_commit": "off",
            "full_page_writes": "off",
            "shared_buffers": "'16MB'",
            "max_wal_senders": 2,
            "log_connections": "on",
            "log_disconnections": "on",
            "log_line_prefix": "'%m [%p] %q%u@%d '",
        }
        conf.update(settings)
        with open(datadir / "postgresql.conf", "a") as f:
            f.write("\n# slotproxy throwaway cluster\n")
            for name, value in conf.items():
                f.write(f"{name} = {value}\n")
        (datadir / "pg_hba.conf").write_text(hba)
        self.running = False

    def dsn(self, user: str = SUPERUSER, database: str = "postgres", password: str | None = None) -> str:
        auth = f"{user}:{password}" if password else user
        return f"postgresql://{auth}@{self.host}:{self.port}/{database}"

    def _pg_ctl(self, *args: str, timeout: float = 60) -> None:
        self.template._run([str(self.template.bindir / "pg_ctl"), "-D", str(self.datadir), *args],
                           timeout=timeout)

    def start(self) -> None:
        self._pg_ctl("-l", str(self.logfile), "-w", "-t", "60", "start")
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        if self.running:
            self._pg_ctl("-m", mode, "-w", "-t", "60", "stop")
            self.running = False

    def restart(self, mode: str = "fast") -> None:
        self.stop(mode)
        self.start()

    def psql(self, sql: str, user: str = SUPERUSER, database: str = "postgres") -> str:
        """Run SQL as the superuser with psql; returns its unaligned output."""
        result = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(user, database),
             "-c", sql], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        if result.returncode != 0:
            raise ClusterError(f"psql failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def log_text(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except OSError:
            return ""

    def remove(self) -> None:
        try:
            # Also a server whose start timed out and came up after all.
            if (self.datadir / "postmaster.pid").exists():
                self.running = True
            self.stop("immediate")
        finally:
            shutil.rmtree(self.datadir, ignore_errors=True)

    def __enter__(self) -> Cluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


"""The command line, with the proxy as a real process: config errors, run, signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from slotproxy.cluster import Cluster
from slotproxy.demo import one_client
from slotproxy.scram import Verifier

from .conftest import wait_until
from .pgraw import RawClient

SLOTPROXY = [sys.executable, "-m", "slotproxy"]


async def run_cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        *SLOTPROXY, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        start_new_session=True)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:  # overran: with whatever it started (workers)
            os.killpg(proc.pid, signal.SIGKILL)
            await proc.wait()
    return proc.returncode, out.decode(), err.decode()  # type: ignore[return-value]


class ProxyProcess:
    """`slotproxy run` in a subprocess; its log lines are collected as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.port = 0
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode().rstrip()
            self.lines.append(line)
            if not self.port and (m := re.search(r"listening on 127\.0\.0\.1:(\d+)", line)):
                self.port = int(m.group(1))

    def log(self) -> str:
        return "\n".join(self.lines)

    async def connect(self, **kwargs: Any) -> asyncpg.Connection:
        return await asyncpg.connect(host="127.0.0.1", port=self.port, user="app",
                                     database="postgres", **kwargs)

    async def wait_exit(self, timeout: float = 30) -> int:
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code


@pytest.fixture
async def run_proxy() -> AsyncIterator[Callable[..., Any]]:
    """`slotproxy run ARGS...` in a subprocess; killed at the end of the test with its
    workers (its process group), whatever is still running."""
    started: list[ProxyProcess] = []

    async def run(*args: str) -> ProxyProcess:
        proc = await asyncio.create_subprocess_exec(*SLOTPROXY, "run", *args,
                                                    stderr=asyncio.subprocess.PIPE,
                                                    start_new_session=True)
        p = ProxyProcess(proc)
        started.append(p)
        return p

    yield run
    for p in started:
        try:
            os.killpg(p.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        await p.proc.wait()


@pytest.fixture
def start_proxy(tmp_path: Path, run_proxy: Any) -> Callable[..., Any]:
    count = 0

    async def start(cluster: Cluster, *flags: str, config: str = "") -> ProxyProcess:
        nonlocal count
        cfg = tmp_path / f"slotproxy{count}.toml"
        count += 1
        cfg.write_text(config)
        p = await run_proxy("--config", str(cfg), "--listen", "127.0.0.1:0",
                            "--backend", f"{cluster.host}:{cluster.port}", *flags)
        await wait_until(lambda: p.port or p.proc.returncode is not None, "the proxy to listen")
        assert p.port, p.log()
        return p

    return start


# -- configuration errors --------------------------------------------------------------------

BAD_CONFIGS = [
    ("[admission]\nmax_qeue = 5\n", "admission.max_qeue: unknown key (did you mean admission.max_queue?)"),
    ("[admission]\nmax_queue = \"ten\"\n", "admission.max_queue: expected an integer, got a string"),
    ("[admission]\nmax_backend_slots = 0\n", "admission.max_backend_slots: must be >= 1, got 0"),
    ("[admission]\nqueue_timeout = -1\n", "admission.queue_timeout: must be a positive number of seconds"),
    ("[proxy]\nlisten = \"localhost\"\n", "proxy.listen: expected \"HOST:PORT\""),
    ("[backend]\nport = 70000\n", "backend.port: must be between 1 and 65535, got 70000"),
    ("[backend]\nhost = \"bad host\"\n", "backend.host: not a valid host name or address"),
    ("[proxy]\nlisten = \"1.2.3.4.5:6432\"\n", "proxy.listen: not a valid IPv4 address: '1.2.3.4.5'"),
    ("[bakend]\nhost = \"x\"\n", "bakend: unknown section (did you mean backend?)"),
    ("[proxy]\nlisten = \n", "invalid TOML"),
    ("[proxy]\nworkers = 4\n[admission]\nmax_backend_slots = 2\n",
     "proxy.workers: 4 workers cannot share admission.max_backend_slots = 2: each needs at least 1 "
     "(or set [monitor] dsn)"),
    ("[proxy]\nlisten = \"127.0.0.1:6432\"\n[admin]\nlisten = \"0.0.0.0:6432\"\n",
     "admin.listen: port 6432 would take proxy.listen's (127.0.0.1:6432): choose another port"),
    ("[backend]\nsslmode = \"require\"\nsslrootcert = \"system\"\n",
     "backend.sslrootcert: \"system\" needs sslmode = \"verify-full\" (not \"require\")"),
]


@pytest.mark.parametrize(("text", "problem"), BAD_CONFIGS, ids=[b[1].split(":")[0] for b in BAD_CONFIGS])
async def test_bad_config_exits_2_with_one_line_naming_file_key_and_problem(
        tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    for command in (["check-config", str(path)], ["run", "--config", str(path)]):
        code, _, err = await run_cli(*command)
        assert code == 2
        [line] = err.strip().splitlines()
        assert line.startswith(f"slotproxy: {path}: {problem}")


async def test_bad_flag_values_name_the_flag(tmp_path: Path) -> None:
    code, _, err = await run_cli("run", "--max-queue", "-1")
    assert (code, err.strip()) == (2, "slotproxy: --max-queue: admission.max_queue: must be >= 0, got -1")
    code, _, err = await run_cli("run", "--backend", "db.example")
    assert code == 2 and err.startswith("slotproxy: --backend: expected \"HOST:PORT\"")


async def test_check_config_accepts_the_example_and_shows_every_value() -> None:
    example = Path(__file__).parent.parent / "config.example.toml"
    code, out, err = await run_cli("check-config", str(example))
    assert code == 0, err
    assert out.startswith(f"{example}: OK")
    assert "admission.max_backend_slots = " in out


async def test_check_config_masks_passwords_and_verifiers(tmp_path: Path) -> None:
    verifier = str(Verifier.make("console secret"))
    path = tmp_path / "secrets.toml"
    path.write_text('[monitor]\ndsn = "postgresql://mon:hunter2@127.0.0.1:5432/postgres"\n'
                    f'[admin.users]\nops = "{verifier}"\n')
    code, out, _ = await run_cli("check-config", str(path))
    assert code == 0
    assert 'monitor.dsn = "postgresql://mon:***@127.0.0.1:5432/postgres"' in out
    assert 'admin.users = { ops = "***" }' in out
    assert "hunter2" not in out and verifier.split("$")[2] not in out
    assert "warning: monitor.dsn holds a password in clear" in out


# -- running -------------------------------------------------------------------------------------


async def test_runs_with_no_file_from_flags_alone(pg: Cluster, run_proxy: Any) -> None:
    p = await run_proxy("--backend", f"{pg.host}:{pg.port}", "--listen", "127.0.0.1:0",
                        "--max-backend-slots", "2")
    await wait_until(lambda: p.port, "the proxy to listen")
    conn = await p.connect(server_settings={"application_name": "flags-only"})
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    await wait_until(lambda: "admitted after" in p.log(), "the admission decision in the log")
    assert re.search(r"C-\d+ app@postgres 127\.0\.0\.1:\d+ admitted after [\d.]+ s "
                     r"\(application_name='flags-only'\)", p.log())
    p.proc.send_signal(signal.SIGTERM)
    assert await p.wait_exit() == 0


async def test_cannot_listen_exits_1_saying_why(pg: Cluster, start_proxy: Any, tmp_path: Path) -> None:
    first = await start_proxy(pg)
    code, _, err = await run_cli("run", "--listen", f"127.0.0.1:{first.port}",
                                 "--backend", f"{pg.host}:{pg.port}")
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{first.port} (proxy.listen): Address already in use" in err
    # The admin endpoints' address is named as theirs, not as the proxy's.
    path = tmp_path / "admin.toml"
    path.write_text(f'[admin]\nlisten = "127.0.0.1:{first.port}"\n')
    code, _, err = await run_cli("run", "--config", str(path), "--listen", "127.0.0.1:0",
                                 "--backend", f"{pg.host}:{pg.port}")
    assert code == 1
    assert f"cannot listen on 127.0.0.1:{first.port} (admin.listen): Address already in use" in err


# -- graceful shutdown ------------------------------------------------------------------------------


async def test_sigterm_refuses_waiters_with_57P01_and_lets_sessions_finish(
        pg: Cluster, start_proxy: Any) -> None:
    p = await start_proxy(pg, "--max-backend-slots", "2", "--log-level", "debug",
                          config="[proxy]\nshutdown_timeout = 30\n")
    live = [await p.connect() for _ in range(2)]
    waiting = [asyncio.create_task(p.connect()) for _ in range(3)]
    await wait_until(lambda: p.log().count(" queued (class default)") == 3, "three clients queued")

    p.proc.send_signal(signal.SIGTERM)
    for task in waiting:
        with pytest.raises(asyncpg.AdminShutdownError) as refused:
            await asyncio.wait_for(task, 10)
        assert refused.value.sqlstate == "57P01"
        assert "slotproxy is shutting down" in str(refused.value)

    with pytest.raises(ConnectionRefusedError):
        await p.connect(timeout=10)  # no longer accepting
    for conn in live:  # live sessions carry on
        assert await conn.fetchval("select 7") == 7
    assert p.proc.returncode is None
    for conn in live:
        await conn.close()
    assert await p.wait_exit() == 0
    assert "3 waiting clients refused; 2 sessions may finish within 30 s" in p.log()


SLEEPING = "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'"


async def test_sessions_are_closed_at_shutdown_timeout(pg: Cluster, start_proxy: Any) -> None:
    p = await start_proxy(pg, config="[proxy]\nshutdown_timeout = 0.5\n")
    idle = await RawClient.connect("127.0.0.1", p.port)
    idle.send_startup()
    await idle.read_until("Z")
    busy = await p.connect()
    query = asyncio.create_task(busy.execute("select pg_sleep(60)"))
    await wait_until(lambda: pg.psql(SLEEPING) == "1", "the query to run")

    p.proc.send_signal(signal.SIGTERM)
    assert await p.wait_exit() == 0
    assert "shutdown timeout: closing 2 sessions" in p.log()
    # The idle one is told why, between messages, as PostgreSQL's own shutdown does.
    error = await idle.read_error_then_eof()
    assert (error["S"], error["C"]) == ("FATAL", "57P01"), error
    assert error["M"] == "terminating connection because slotproxy is shutting down"
    # The busy one's backend is cancelled: its slot does not wait for the query's end.
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
        await query
    await wait_until(lambda: pg.psql(SLEEPING) == "0", "the backend to stop its query")
    assert "canceling statement due to user request" in pg.log_text()


async def test_a_second_signal_closes_at_once(pg: Cluster, start_proxy: Any) -> None:
    p = await start_proxy(pg, config="[proxy]\nshutdown_timeout = 600\n")
    conn = await p.connect()
    p.proc.send_signal(signal.SIGTERM)
    await wait_until(lambda: "shutting down gracefully" in p.log(), "the first signal to be seen")
    p.proc.send_signal(signal.SIGINT)
    assert await p.wait_exit(timeout=10) == 0
    assert "SIGINT received again: closing every session now" in p.log()
    conn.terminate()


# -- reload, workers, logs, status, hash-password ------------------------------------------------


async def test_sighup_reloads_live_and_an_invalid_file_changes_nothing(
        pg: Cluster, tmp_path: Path, run_proxy: Any) -> None:
    from slotproxy.cluster import free_port

    port = free_port()
    path = tmp_path / "live.toml"
    text = (f'[proxy]\nlisten = "127.0.0.1:{port}"\n[backend]\nhost = "{pg.host}"\nport = {pg.port}\n'
            '[admission]\nmax_backend_slots = 1\nqueue_timeout = 60\n')
    path.write_text(text)
    p = await run_proxy("--config", str(path), "--log-level", "debug")
    await wait_until(lambda: p.port, "the proxy to listen")
    first = await p.connect()
    waiters = [asyncio.create_task(p.connect()) for _ in range(2)]
    await wait_until(lambda: p.log().count("queued (class default)") == 2, "two clients queued")

    path.write_text(text.replace("max_backend_slots = 1", "max_backend_slots = 3"))
    p.proc.send_signal(signal.SIGHUP)
    second, third = await asyncio.wait_for(asyncio.gather(*waiters), 10)  # admitted at once
    assert "admission.max_backend_slots 1 -> 3" in p.log()

    path.write_text(text.replace("max_backend_slots = 1", "max_backend_slots = -4"))
    p.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: "reload failed" in p.log(), "the failed reload in the log")
    assert "admission.max_backend_slots: must be >= 1, got -4" in p.log()
    fourth = asyncio.create_task(p.connect())
    await wait_until(lambda: p.log().count("queued (class default)") == 3,
                     "the old limit of 3 still holding the fourth client")
    for conn in (first, second, third):  # no session was dropped by either reload
        assert await conn.fetchval("select 1") == 1
    await first.close()
    await (await asyncio.wait_for(fourth, 10)).close()
    for conn in (second, third):
        await conn.close()
    p.proc.send_signal(signal.SIGTERM)
    assert await p.wait_exit() == 0


async def test_a_reload_says_when_a_command_line_flag_holds_a_key_the_file_changed(
        pg: Cluster, tmp_path: Path, start_proxy: Any) -> None:
    p = await start_proxy(pg, "--max-backend-slots", "2", config="[admission]\nmax_backend_slots = 5\n")
    cfg = tmp_path / "slotproxy0.toml"  # what start_proxy wrote
    cfg.write_text("[admission]\nmax_backend_slots = 6\nmax_queue = 7\n")
    p.proc.send_signal(signal.SIGHUP)
    await wait_until(lambda: "reloaded" in p.log(), "the reload")
    assert ("admission.max_queue 1000 -> 7; admission.max_backend_slots: the file says 6, but "
            "--max-backend-slots on the command line holds it at 2") in p.log()


async def two_workers(pg: Cluster, tmp_path: Path, run_proxy: Any, more: str) -> tuple[Any, int]:
    """`slotproxy run` with workers = 2 and `more` config, once both workers listen."""
    from slotproxy.cluster import free_port

    port = free_port()
    path = tmp_path / "workers.toml"
    path.write_text(f'[proxy]\nlisten = "127.0.0.1:{port}"\nworkers = 2\n'
                    f'[backend]\nhost = "{pg.host}"\nport = {pg.port}\n' + more)
    p = await run_proxy("--config", str(path))
    await wait_until(lambda: p.log().count(f"listening on 127.0.0.1:{port}") == 2,
                     "both workers listening")
    return p, port


async def test_two_workers_share_the_port_and_serve_a_burst(
        pg: Cluster, tmp_path: Path, run_proxy: Any) -> None:
    p, port = await two_workers(pg, tmp_path, run_proxy,
                                '[admission]\nmax_backend_slots = 4\nqueue_timeout = 60\n')
    assert "W0 " in p.log() and "W1 " in p.log()
    outcomes = await asyncio.gather(*(one_client("127.0.0.1", port, "app", "postgres", hold=0.1)
                                      for _ in range(40)))
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
    admitted = [line for line in p.lines if "admitted after" in line]
    assert len(admitted) == 40
    assert any(line.startswith("W0 ") for line in admitted) and \
        any(line.startswith("W1 ") for line in admitted), "both workers accepted clients"
    p.proc.send_signal(signal.SIGTERM)
    assert await p.wait_exit() == 0


async def test_a_restarted_worker_is_paused_like_the_others(
        pg: Cluster, tmp_path: Path, run_proxy: Any) -> None:
    p, port = await two_workers(pg, tmp_path, run_proxy, "[admin]\ntrust_loopback = true\n")

    def paused(worker: str) -> int:
        return sum(1 for line in p.lines if line.startswith(f"{worker} ") and "paused admission" in line)

    psql = await asyncio.create_subprocess_exec(
        "psql", "-X", "-w", "-h", "127.0.0.1", "-p", str(port), "-d", "slotproxy", "-U", "ops",
        "-c", "PAUSE", stdout=asyncio.subprocess.DEVNULL)
    assert await psql.wait() == 0
    await wait_until(lambda: paused("W0") == 1 and paused("W1") == 1, "both workers paused")
    [pid] = [int(m.group(1)) for line in p.lines
             if (m := re.search(r"worker 0 started \(pid (\d+)", line))]
    os.kill(pid, signal.SIGKILL)
    await wait_until(lambda: paused("W0") == 2, "the restarted worker paused as well", timeout=15)
    p.proc.send_signal(signal.SIGTERM)
    assert await p.wait_exit() == 0


def exited(pid: int) -> bool:
    """Whether process `pid` has ended (a zombie counts: nobody may reap an orphan here)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


async def test_workers_stop_gracefully_when_the_supervisor_is_killed(
        pg: Cluster, tmp_path: Path, run_proxy: Any) -> None:
    p, port = await two_workers(pg, tmp_path, run_proxy, "")
    pids = [int(m.group(1)) for line in p.lines if (m := re.search(r"worker \d started \(pid (\d+)", line))]
    assert len(pids) == 2
    conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="postgres")
    p.proc.kill()  # as the OOM killer would: no signal reaches the workers
    await p.proc.wait()
    await wait_until(lambda: p.log().count("the supervisor is gone: shutting down gracefully") == 2
                     and p.log().count("waiting clients refused;") == 2,
                     "both workers to see that the supervisor is gone, and stop listening")
    # Orphans would hold their share of the server's slots beside a new supervisor's workers:
    # they stop taking clients, and the session open goes on until its client ends it.
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="postgres")
    assert await conn.fetchval("select 6 * 7") == 42
    assert not all(exited(pid) for pid in pids), "the worker with a session waits for it"
    await conn.close()
    await wait_until(lambda: all(exited(pid) for pid in pids), "both workers to exit", timeout=15)


async def test_a_worker_sees_its_supervisor_gone_when_the_channel_resets() -> None:
    # A supervisor killed before it read what this worker sent: the worker reads a reset,
    # not an end of file, and must take it the same way.
    from slotproxy.workers import ControlChannel

    ours, theirs = socket.socketpair()

    async def apply(command: str, *args: str) -> None:
        pass

    channel = ControlChannel(ours.detach(), apply)
    await channel.start()
    lost = asyncio.Event()
    channel.when_lost(lost.set)
    channel.send("pause", ())
    await wait_until(lambda: theirs.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b"{",
                     "the message in the supervisor's socket, unread")
    theirs.close()
    await asyncio.wait_for(lost.wait(), 5)
    await channel.close()


async def test_json_logs_carry_the_connection_fields(pg: Cluster, start_proxy: Any) -> None:
    p = await start_proxy(pg, "--log-format", "json")
    conn = await p.connect(server_settings={"application_name": "shipper"})
    await conn.close()
    await wait_until(lambda: "admitted after" in p.log(), "the admission line")
    entries = [json.loads(line) for line in p.lines if line.startswith("{")]
    assert len(entries) == len(p.lines), "every line is one JSON object"
    [admitted] = [e for e in entries if "admitted after" in e["message"]]
    assert admitted["user"] == "app" and admitted["database"] == "postgres"
    assert admitted["application_name"] == "shipper" and admitted["level"] == "info"
    assert admitted["client"].startswith("127.0.0.1:") and isinstance(admitted["conn"], int)


async def test_hash_password_makes_a_verifier_postgresql_accepts(pg: Cluster) -> None:
    proc = await asyncio.create_subprocess_exec(
        *SLOTPROXY, "hash-password", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate("tëst pass\n".encode())
    verifier = out.decode().strip()
    assert proc.returncode == 0 and verifier.startswith("SCRAM-SHA-256$4096:")
    # The same derivation as the server's: a role with it as its stored password logs in.
    pg.psql(f"create role hashed login password '{verifier}'")
    pg.psql("select 1")
    hba = pg.datadir / "pg_hba.conf"
    hba.write_text("host all hashed 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
    pg.psql("select pg_reload_conf()")
    conn = await asyncpg.connect(host=pg.host, port=pg.port, user="hashed", password="tëst pass",
                                 database="postgres")
    assert await conn.fetchval("select current_user") == "hashed"
    await conn.close()
    with pytest.raises(asyncpg.InvalidPasswordError):  # the rule is in force: no trust for it
        await asyncpg.connect(host=pg.host, port=pg.port, user="hashed", password="test pass",
                              database="postgres")


async def test_status_command_prints_who_waits(pg: Cluster, start_proxy: Any) -> None:
    p = await start_proxy(pg, "--max-backend-slots", "1", "--log-level", "debug",
                          config='[admin]\nlisten = "127.0.0.1:0"\n')
    await wait_until(lambda: "admin endpoints on" in p.log(), "the admin address in the log")
    admin = re.search(r"admin endpoints on (127\.0\.0\.1:\d+)", p.log()).group(1)
    holder = await p.connect()
    waiter = asyncio.create_task(p.connect(server_settings={"application_name": "month-end"}))
    await wait_until(lambda: "queued (class default)" in p.log(), "the second client queued")

    code, out, _ = await run_cli("status", "--admin", admin)
    assert code == 0 and "WAITING (1)" in out and "month-end" in out and "SESSIONS (1)" in out
    code, out, _ = await run_cli("status", "--admin", admin, "--json")
    assert code == 0 and json.loads(out)["waiting"][0]["application_name"] == "month-end"
    await holder.close()
    await (await waiter).close()
    code, _, err = await run_cli("status", "--admin", "127.0.0.1:1")
    assert code == 1 and "cannot read http://127.0.0.1:1/status" in err

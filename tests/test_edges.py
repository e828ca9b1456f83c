"""The hard edges of a session's life: bytes sent early, half-closes, clients that
leave mid-startup, cancel senders that do not wait, refusals at the deadline."""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from functools import partial
from typing import Any

import asyncpg
import pytest

from slotproxy import backend, relay, wire
from slotproxy.admission import Admission, Limits, State, Ticket
from slotproxy.cluster import Cluster
from slotproxy.gate import Gate
from slotproxy.server import Proxy
from slotproxy.session import EARLY_BYTES_LIMIT, Phase

from .conftest import ALICE_PASSWORD, wait_until
from .pgraw import TERMINATE, RawClient, query


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


def only_session(proxy: Proxy) -> Any:
    [session] = proxy.sessions
    return session


async def results_of(raw: RawClient) -> list[bytes]:
    """The DataRow bodies up to the next ReadyForQuery."""
    return [body for t, body in await raw.read_until("Z") if t == "D"]


ANSWER_42 = struct.pack("!hi", 1, 2) + b"42"


async def fill_server(pg: Cluster, n: int = 10) -> list[asyncpg.Connection]:
    conns = [await asyncpg.connect(pg.dsn("app")) for _ in range(n)]
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(pg.dsn("app"))
    return conns


# -- bytes sent before the server answered --------------------------------------------------


async def test_bytes_sent_while_connecting_reach_the_server(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg)
    raw = await RawClient.connect(**at(proxy))
    # post_auth_delay keeps the server silent for two seconds after it took the startup packet.
    raw.send_startup(options="-c post_auth_delay=2")
    await wait_until(lambda: proxy.sessions and only_session(proxy).phase is Phase.CONNECTING,
                     "the proxy connecting to the server")
    raw.send(query("select 6 * 7"))
    await raw.read_until("Z")
    assert await results_of(raw) == [ANSWER_42]
    raw.send(TERMINATE)


async def test_early_bytes_are_sent_again_after_a_refusal(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"queue_timeout": 60})
    outsiders = await fill_server(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_startup({"user": "app", "database": "postgres"}) + query("select 6 * 7"))
    await wait_until(lambda: proxy.gate.server_refusals >= 2, "refused attempts")
    await outsiders.pop().close()
    await raw.read_until("Z")
    assert await results_of(raw) == [ANSWER_42]
    raw.send(TERMINATE)
    for conn in outsiders:
        await conn.close()


async def test_too_many_early_bytes_get_08P01_at_once(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg)

    def send_too_much() -> bytes:
        # One write, so the proxy may read it all before the session's task first runs.
        with socket.create_connection(tuple(at(proxy).values()), timeout=10) as sock:
            startup = wire.encode_startup({"user": "app", "database": "postgres"})
            sock.sendall(startup + query("x" * (EARLY_BYTES_LIMIT + 1000)))
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
            return received

    received = await asyncio.get_running_loop().run_in_executor(None, send_too_much)
    assert received[:1] == b"E", received[:40]
    fields = wire.parse_fields(received[5:])
    assert fields["C"] == "08P01"
    assert f"more than {EARLY_BYTES_LIMIT} bytes before the server answered" in fields["M"]
    await wait_until(lambda: not proxy.sessions, "the session to be gone")
    assert not proxy.gate.admission.holders


# -- cancel senders -------------------------------------------------------------------------------


async def wait_until_sql(conn: asyncpg.Connection, sql: str, timeout: float = 10) -> None:
    """Until `sql` returns true on the server."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await conn.fetchval(sql):
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {sql!r}")
        await asyncio.sleep(0.01)  # wait_until poll interval


def cancel_key(conn: asyncpg.Connection) -> tuple[int, bytes]:
    return conn.get_server_pid(), struct.pack("!i", conn._protocol.backend_secret)


@pytest.mark.parametrize("how", ["half-close", "close"])
async def test_a_cancel_sender_that_does_not_wait_is_still_served(
        pg: Cluster, proxy_factory: Any, how: str) -> None:
    proxy = await proxy_factory(pg)
    conn = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    running = asyncio.create_task(conn.execute("select pg_sleep(30)"))
    pid, key = cancel_key(conn)
    observer = await asyncpg.connect(pg.dsn())
    await wait_until_sql(observer, f"select state = 'active' from pg_stat_activity where pid = {pid}")
    await observer.close()

    def send_and_leave() -> None:
        with socket.create_connection(tuple(at(proxy).values()), timeout=5) as sender:
            sender.sendall(wire.encode_cancel(pid, key))
            if how == "half-close":
                sender.shutdown(socket.SHUT_WR)

    await asyncio.get_running_loop().run_in_executor(None, send_and_leave)
    with pytest.raises(asyncpg.QueryCanceledError):
        await asyncio.wait_for(running, 5)
    await conn.close()


# -- clients that leave while the server starts their backend -------------------------------


async def test_a_slot_is_free_only_when_the_abandoned_backend_is_gone(
        cluster_factory: Any, proxy_factory: Any) -> None:
    # 3 slots, 1 reserved: 2 for non-superusers, and the proxy may use both.
    pg = cluster_factory(max_connections=3, superuser_reserved_connections=1)
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 2, "queue_timeout": 30})
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    leaver = await RawClient.connect(**at(proxy))
    leaver.send_startup(options="-c post_auth_delay=2", application_name="leaver")
    await wait_until(lambda: "application_name=leaver" in pg.log_text(),
                     "the leaver's backend to be authorized (and hold its slot)")
    leaver.close()
    await wait_until(lambda: any(s.phase is Phase.CLOSED for s in proxy.sessions) or
                     len(proxy.sessions) == 1, "the leaver's session to end")
    assert len(proxy.gate.admission.holders) == 2, "its backend still holds the slot"
    # A password client must not be let in before that backend is gone: the server
    # would refuse it after its password exchange (reserved slots).
    conn = await asyncpg.connect(**at(proxy), user="alice", password=ALICE_PASSWORD,
                                 database="postgres", timeout=30)
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    await holder.close()


# -- the deadline ----------------------------------------------------------------------------------


async def test_deadline_while_the_server_refuses_gives_its_error_and_the_retries(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"queue_timeout": 1})
    outsiders = await fill_server(pg)
    with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
        await asyncpg.connect(**at(proxy), user="app", database="postgres")
    assert "sorry, too many clients already" in str(refused.value)
    assert "slotproxy retried" in refused.value.detail
    assert "(admission.queue_timeout = 1 s)" in refused.value.detail
    for conn in outsiders:
        await conn.close()


async def test_deadline_while_the_server_is_down_gives_08006(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"queue_timeout": 1})
    await asyncio.get_running_loop().run_in_executor(None, pg.stop)
    with pytest.raises(asyncpg.PostgresError) as refused:
        await asyncpg.connect(**at(proxy), user="app", database="postgres")
    assert refused.value.sqlstate == "08006"
    assert f"could not reach the server at 127.0.0.1:{pg.port}" in str(refused.value)
    assert "slotproxy retried" in refused.value.detail


# -- order and races ---------------------------------------------------------------------------------


async def test_a_freed_slot_goes_to_the_longest_waiter(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1})
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    order: list[int] = []

    async def client(i: int) -> None:
        conn = await asyncpg.connect(**at(proxy), user="app", database="postgres")
        order.append(i)
        await conn.close()

    tasks = []
    for i in range(5):
        tasks.append(asyncio.create_task(client(i)))
        await wait_until(lambda i=i: proxy.gate.admission.waiting == i + 1, f"client {i} waiting")
    await holder.close()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4]


async def test_a_waiter_admitted_as_it_is_cancelled_gives_its_slot_on() -> None:
    gate = Gate(Admission(Limits(max_slots=1, max_queue=10)))
    holder, racer, next_in_line = Ticket(), Ticket(), Ticket()
    assert gate.enter(holder)
    assert not gate.enter(racer) and not gate.enter(next_in_line)
    racing = asyncio.create_task(gate.wait(racer))
    following = asyncio.create_task(gate.wait(next_in_line))
    await wait_until(lambda: racer.waker is not None and next_in_line.waker is not None, "both waiting")
    gate.release(holder)  # admits the racer ...
    racing.cancel()  # ... which is cancelled in the same instant
    with pytest.raises(asyncio.CancelledError):
        await racing
    await asyncio.wait_for(following, 5)
    assert racer.state is State.DONE and next_in_line.state is State.HOLDING
    assert gate.admission.holders == {next_in_line}


# -- protocol 3.2 and cancels with unknown keys -----------------------------------------------------


async def test_a_protocol_3_2_client_at_a_full_server_waits_and_gets_in(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"queue_timeout": 60})
    outsiders = await fill_server(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_startup({"user": "app", "database": "postgres"}, minor=2))
    await wait_until(lambda: proxy.gate.server_refusals >= 2,
                     "refusals after NegotiateProtocolVersion to be retried")
    await outsiders.pop().close()
    messages = await raw.read_until("Z")
    assert [t for t, _ in messages][:2] == ["v", "R"]
    assert "E" not in [t for t, _ in messages]
    raw.send(TERMINATE)
    for conn in outsiders:
        await conn.close()


async def test_a_cancel_with_an_unknown_key_is_dropped_and_logged(
        pg: Cluster, proxy_factory: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    proxy = await proxy_factory(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_cancel(12345, b"nope"))
    assert await raw.read_eof() == b"", "a cancel request is never answered"
    assert "cancel request for unknown backend pid 12345 dropped" in caplog.text
    assert proxy.unknown_cancels.count == 1


@pytest.mark.parametrize("log_connections", [True, False])
async def test_log_connections_off_keeps_refusals_in_the_log(
        pg: Cluster, proxy_factory: Any, caplog: Any, log_connections: bool) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    proxy = await proxy_factory(pg, proxy={"log_connections": log_connections},
                                admission={"max_backend_slots": 1, "max_queue": 0})
    holder = await asyncpg.connect(**at(proxy), user="postgres", database="postgres", ssl=False)
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(**at(proxy), user="postgres", database="postgres", ssl=False)
    await holder.close()

    lines = [r.getMessage() for r in caplog.records if r.name == "slotproxy.session"]
    admitted = [line for line in lines if "admitted" in line]
    assert len(admitted) == (1 if log_connections else 0), lines
    assert sum("refused (queue_full) after" in line for line in lines) == 1, lines


async def test_without_the_compiled_walker_the_proxy_says_so_and_serves(
        pg: Cluster, proxy_factory: Any, caplog: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(wire, "CompiledWalker", None)  # as installed without a C compiler
    monkeypatch.setattr(wire, "DEFAULT_WALKER", wire.Walker)
    monkeypatch.setattr(relay, "DEFAULT_PUMP", relay.PyPump)
    monkeypatch.setattr(relay, "SOCKETS", False)
    caplog.set_level(logging.WARNING, logger="slotproxy")
    proxy = await proxy_factory(pg)
    assert "slotproxy._walker was not built at install" in caplog.text
    conn = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    assert await conn.fetchval("select 1") == 1
    [session] = proxy.sessions
    assert type(session.tracker.walker) is wire.Walker and session.state == wire.IDLE
    assert isinstance(session.relay.client_half, relay.PyPump)
    await conn.close()


# What PostgreSQL 15 sent a trust client whose backend was ended by SIGTERM (a fast
# shutdown, pg_terminate_backend) while it started: its buffered AuthenticationOk, then this.
ADMIN_SHUTDOWN = (b"E\x00\x00\x00tSFATAL\x00VFATAL\x00C57P01\x00Mterminating connection due to "
                  b"administrator command\x00Fpostgres.c\x00L3211\x00RProcessInterrupts\x00\x00")
AUTH_OK = b"R\x00\x00\x00\x08\x00\x00\x00\x00"


@pytest.mark.parametrize("first", [AUTH_OK + ADMIN_SHUTDOWN, ADMIN_SHUTDOWN],
                         ids=["after-trust-auth", "before-auth"])
async def test_a_backend_ended_while_it_starts_is_taken_for_a_refusal_to_retry(first: bytes) -> None:
    # No server stops on cue inside that window (post_auth_delay holds the signal until the
    # first query), so the server's first answer is fed to the decision as it was captured.
    loop = asyncio.get_running_loop()
    outcomes = []
    for retry in (True, False):  # a queued client, and a bypass lane that takes what comes
        ours, theirs = socket.socketpair()
        result: asyncio.Future[bytearray] = loop.create_future()
        transport, _ = await loop.create_connection(partial(backend._FirstAnswer, result, retry), sock=ours)
        theirs.sendall(first)
        try:
            outcomes.append(await asyncio.wait_for(result, 5))
        except backend.ConnectFailed as e:
            outcomes.append((e.sqlstate, e.after_auth, e.unreachable))
        transport.close()
        theirs.close()
    assert outcomes == [("57P01", first.startswith(b"R"), False), bytearray(first)]

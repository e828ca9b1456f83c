"""The core, end to end: real PostgreSQL clusters, real clients (asyncpg, psql, raw bytes)."""

from __future__ import annotations

import asyncio
import gc
import io
import os
import struct
from typing import Any

import asyncpg
import pytest

from slotproxy import relay, wire
from slotproxy.cluster import Cluster, free_port
from slotproxy.demo import one_client
from slotproxy.relay import Relay, SocketRelay
from slotproxy.server import Proxy
from slotproxy.session import Session

from .conftest import ALICE_PASSWORD, PeakWatcher, wait_until
from .pgraw import TERMINATE, RawClient, query


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


async def connect(proxy: Proxy, user: str = "app", **kwargs: Any) -> asyncpg.Connection:
    return await asyncpg.connect(**at(proxy), user=user, database="postgres", **kwargs)


async def psql(proxy: Proxy, sql: str, user: str = "app", password: str | None = None,
               **env: str) -> tuple[int, str, str]:
    a = proxy.addresses[0]
    environ = {"PGPASSWORD": password} if password else {}
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-w", "-A", "-t", "-h", a.host, "-p", str(a.port), "-U", user, "-d", "postgres",
        "-c", sql, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", **environ, **env})
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


def admission(proxy: Proxy) -> Any:
    return proxy.gate.admission


# -- the burst ------------------------------------------------------------------------------


async def test_sixty_clients_all_get_through_where_direct_ones_are_refused(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 8, "queue_timeout": 60})
    observer = await asyncpg.connect(pg.dsn())  # superuser, one of the 2 slots the proxy leaves

    direct = await asyncio.gather(*(one_client(pg.host, pg.port, "app", "postgres", hold=0.3)
                                    for _ in range(60)))
    refused = [o for o in direct if not o.ok]
    assert refused, "direct: the server should have refused some of 60 clients"
    assert {o.sqlstate for o in refused} == {"53300"}
    assert any("too many clients" in (o.message or "") for o in refused)

    watcher = PeakWatcher(observer, "select count(*) from pg_stat_activity where usename = 'app'")
    proxied = await asyncio.gather(*(one_client(**at(proxy), user="app", database="postgres", hold=0.3)
                                     for _ in range(60)))
    peak = await watcher.stop()
    failed = [o for o in proxied if not o.ok]
    assert not failed, f"through the proxy every client must succeed: {failed[:3]}"
    assert 0 < peak <= 8, f"the server saw {peak} proxied sessions at once; the limit is 8"
    assert admission(proxy).waiting == 0 and not admission(proxy).holders


# -- refusals the proxy sends itself -----------------------------------------------------------


async def test_queue_full_is_refused_at_once_with_53300_naming_the_limit(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1, "max_queue": 1})
    holder = await connect(proxy)
    waiter = asyncio.create_task(connect(proxy))
    await wait_until(lambda: admission(proxy).waiting == 1, "one client waiting")

    with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
        await connect(proxy)
    assert refused.value.sqlstate == "53300"
    assert "slotproxy queue full: 1 clients already waiting" in str(refused.value)
    assert "(admission.max_queue = 1)" in str(refused.value)

    code, _, err = await psql(proxy, "select 1")
    assert code == 2
    assert "FATAL:  slotproxy queue full: 1 clients already waiting for a server slot " \
           "(admission.max_queue = 1)" in err

    await holder.close()
    second = await waiter
    assert await second.fetchval("select 1") == 1
    await second.close()


async def test_queue_timeout_says_how_long_and_which_key(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1, "queue_timeout": 0.5})
    holder = await connect(proxy)

    with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
        await connect(proxy)
    text = str(refused.value)
    assert refused.value.sqlstate == "53300"
    assert "no server slot came free within 0.5 s (admission.queue_timeout = 0.5 s)" in text

    code, _, err = await psql(proxy, "select 1")
    assert code == 2
    assert "FATAL:  slotproxy: no server slot came free within 0.5 s " \
           "(admission.queue_timeout = 0.5 s)" in err
    assert "1 of 1 slots are in use (admission.max_backend_slots)" in err
    assert admission(proxy).waiting == 0
    await holder.close()


async def test_a_waiter_that_hangs_up_leaves_no_trace(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1})
    holder = await connect(proxy)
    ghost = await RawClient.connect(**at(proxy))
    ghost.send_startup(application_name="ghost")
    await wait_until(lambda: admission(proxy).waiting == 1, "the ghost waiting")
    patient = asyncio.create_task(connect(proxy, server_settings={"application_name": "patient"}))
    await wait_until(lambda: admission(proxy).waiting == 2, "two clients waiting")

    ghost.close()
    await wait_until(lambda: admission(proxy).waiting == 1, "the ghost to leave the queue")

    await holder.close()
    conn = await asyncio.wait_for(patient, 10)
    assert await conn.fetchval("show application_name") == "patient"
    await conn.close()
    assert "application_name=ghost" not in pg.log_text(), "the ghost must never reach the server"


# -- the server refusing, restarting, or full of others ------------------------------------------


async def test_clients_waiting_through_a_server_restart_get_through(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 3, "queue_timeout": 60})
    holders = [await connect(proxy) for _ in range(3)]
    waiters = [asyncio.create_task(one_client(**at(proxy), user="app", database="postgres", hold=0.1))
               for _ in range(6)]
    await wait_until(lambda: admission(proxy).waiting == 6, "six clients waiting")

    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, pg.stop)
    await wait_until(lambda: proxy.gate.server_refusals >= 2,
                     "connection attempts refused while the server is down")
    await loop.run_in_executor(None, pg.start)

    outcomes = await asyncio.gather(*waiters)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]
    for conn in holders:
        conn.terminate()


async def test_slots_taken_outside_the_proxy_make_clients_wait_not_fail(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 8, "queue_timeout": 60})
    outsiders = [await asyncpg.connect(pg.dsn("app")) for _ in range(10)]  # every slot taken
    with pytest.raises(asyncpg.TooManyConnectionsError):
        await asyncpg.connect(pg.dsn("app"))  # the server is really full

    clients = [asyncio.create_task(one_client(**at(proxy), user="app", database="postgres", hold=0.1))
               for _ in range(5)]
    await wait_until(lambda: proxy.gate.server_refusals >= 3, "the proxy retrying refused connections")
    assert all(not c.done() for c in clients), "nobody may fail while the server is full"

    for conn in outsiders:
        await conn.close()
    outcomes = await asyncio.gather(*clients)
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok]


# -- cancel requests ------------------------------------------------------------------------------


@pytest.mark.parametrize("server_full", [False, True], ids=["slots-free", "server-full"])
async def test_cancel_through_the_proxy_ends_a_long_query(
        pg: Cluster, proxy_factory: Any, server_full: bool) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 2})
    conn = await connect(proxy)
    outsiders = [await asyncpg.connect(pg.dsn("app")) for _ in range(9)] if server_full else []

    with pytest.raises(TimeoutError):
        # On timeout asyncpg sends a CancelRequest to the proxy's address.
        await conn.execute("select pg_sleep(30)", timeout=0.5)
    # Only a delivered cancel frees the backend before 30 s.
    assert await conn.fetchval("select 42", timeout=5) == 42
    await conn.close()
    for o in outsiders:
        await o.close()


async def test_cancel_with_an_unknown_key_is_dropped(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_cancel(12345, b"nope"))
    assert await raw.read_eof() == b"", "a cancel request is never answered"
    conn = await connect(proxy)
    assert await conn.fetchval("select 1") == 1
    await conn.close()


# -- authentication stays end to end ----------------------------------------------------------------


async def test_scram_password_authentication_end_to_end(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg)
    conn = await connect(proxy, user="alice", password=ALICE_PASSWORD)
    assert await conn.fetchval("select current_user") == "alice"
    await conn.close()

    code, out, err = await psql(proxy, "select current_user", user="alice", password=ALICE_PASSWORD)
    assert (code, out.strip()) == (0, "alice"), err

    with pytest.raises(asyncpg.InvalidPasswordError) as refused:
        await connect(proxy, user="alice", password="wrong")
    assert refused.value.sqlstate == "28P01"
    assert 'password authentication failed for user "alice"' in str(refused.value)
    await wait_until(lambda: not admission(proxy).holders, "the refused session's slot to come back")


# -- malformed first packets ----------------------------------------------------------------------

MALFORMED = [
    # (case, bytes, half-close after sending, expected SQLSTATE or None for a silent close)
    ("garbage", b"GET / HTTP/1.1\r\nHost: db\r\n\r\n", False, "08P01"),
    ("length 4", struct.pack("!ii", 4, 196608), False, "08P01"),
    ("length 100000", struct.pack("!ii", 100000, 196608), False, "08P01"),
    ("truncated", wire.encode_startup({"user": "app"})[:-5], True, "08P01"),
    ("unknown code", struct.pack("!ii", 8, (1234 << 16) | 7777), False, "08P01"),
    ("TLS hello", bytes.fromhex("160301020001") + b"\x00" * 60, False, None),
]


@pytest.mark.parametrize(("case", "data", "half_close", "sqlstate"), MALFORMED,
                         ids=[m[0] for m in MALFORMED])
async def test_malformed_first_packets(pg: Cluster, proxy_factory: Any, case: str, data: bytes,
                                       half_close: bool, sqlstate: str | None) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1})
    raw = await RawClient.connect(**at(proxy))
    raw.send(data)
    if half_close:
        raw.writer.write_eof()
    if sqlstate is None:
        assert await raw.read_eof() == b"", "a TLS client cannot read an ErrorResponse: just close"
    else:
        fields = await raw.read_error_then_eof()
        assert (fields["S"], fields["C"]) == ("FATAL", sqlstate)
    assert admission(proxy).waiting == 0 and not admission(proxy).holders
    conn = await connect(proxy)  # the one slot is free; the proxy serves on
    assert await conn.fetchval("select 1") == 1
    await conn.close()


async def test_truncated_packet_times_out_with_08P01(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, proxy={"startup_timeout": 0.3})
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_startup({"user": "app"})[:10])
    fields = await raw.read_error_then_eof()
    assert fields["C"] == "08P01" and "proxy.startup_timeout" in fields["M"]


async def test_a_silent_client_is_closed_at_startup_timeout(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, proxy={"startup_timeout": 0.3})
    raw = await RawClient.connect(**at(proxy))
    assert await raw.read_eof(timeout=5) == b""
    await wait_until(lambda: not proxy.sessions, "the silent session to end")


async def test_ssl_and_gss_requests_are_answered_N(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send(struct.pack("!ii", 8, wire.GSSENC_REQUEST_CODE))
    assert await raw.reader.readexactly(1) == b"N"
    raw.send(struct.pack("!ii", 8, wire.SSL_REQUEST_CODE))
    assert await raw.reader.readexactly(1) == b"N"
    raw.send_startup()
    await raw.read_until("Z")
    raw.send(TERMINATE)
    assert await raw.read_eof() == b""


async def test_protocol_3_2_is_negotiated_by_the_server(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_startup({"user": "app", "database": "postgres"}, minor=2))
    messages = await raw.read_until("Z")
    assert messages[0][0] == "v", "PostgreSQL 15 answers NegotiateProtocolVersion, relayed as is"
    raw.send(TERMINATE)


# -- nothing lost ---------------------------------------------------------------------------------


@pytest.mark.parametrize("queued", [False, True], ids=["slot-free", "queued"])
async def test_bytes_sent_before_the_server_answered_are_not_lost(
        pg: Cluster, proxy_factory: Any, queued: bool) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1})
    holder = await connect(proxy) if queued else None
    raw = await RawClient.connect(**at(proxy))
    raw.send(wire.encode_startup({"user": "app", "database": "postgres"}) + query("select 6 * 7"))
    if holder is not None:
        await wait_until(lambda: admission(proxy).waiting == 1, "the raw client waiting")
        await holder.close()
    await raw.read_until("Z")  # the startup phase
    answer = await raw.read_until("Z")  # the query's results
    rows = [body for t, body in answer if t == "D"]
    assert rows == [struct.pack("!hi", 1, 2) + b"42"]
    raw.send(TERMINATE)
    assert await raw.read_eof() == b""


async def test_large_result_and_copy_both_ways_arrive_complete(
        pg: Cluster, proxy_factory: Any, relay_kind: str) -> None:
    proxy = await proxy_factory(pg)
    conn = await connect(proxy)
    [session] = proxy.sessions
    if relay_kind == "sockets":
        assert isinstance(session.relay, relay.SocketRelay)
    else:
        assert isinstance(session.relay.client_half, relay.DEFAULT_PUMP)
    rows = await conn.fetch("select i, repeat(md5(i::text), 32) as s from generate_series(1, 51200) i")
    assert len(rows) == 51200
    assert sum(len(r["s"]) for r in rows) == 51200 * 1024  # 50 MiB of payload
    assert rows[-1]["s"][:32] == await conn.fetchval("select md5('51200')")

    await conn.execute("create temp table copied (id int, payload text)")
    await conn.copy_records_to_table(
        "copied", records=((i, f"row {i}") for i in range(100_000)), columns=["id", "payload"])
    assert await conn.fetchrow("select count(*), sum(id) from copied") == (100_000, sum(range(100_000)))

    out = io.BytesIO()
    await conn.copy_from_table("copied", output=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 100_000 and lines[-1] == b"99999\trow 99999"
    # The halves counted what they relayed, and the tracker followed it to the end.
    assert session.relay.bytes_to_client > 50 * 2**20 and session.relay.bytes_to_server > 100_000 * 8
    assert session.state == wire.IDLE
    await conn.close()


async def test_a_client_vanishing_mid_query_frees_its_slot_soon(
        pg: Cluster, proxy_factory: Any, relay_kind: str) -> None:
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1})
    observer = await asyncpg.connect(pg.dsn())
    vanishing = await connect(proxy)
    relayed_by(proxy, relay_kind)
    query_task = asyncio.create_task(vanishing.execute("select pg_sleep(30)"))
    await wait_until_async(observer, "select count(*) from pg_stat_activity"
                                     " where query like 'select pg_sleep%' and state = 'active'", 1)
    vanishing.terminate()  # writes Terminate and drops the socket; the backend is still busy
    # The backend would sleep 30 s; the proxy cancels it, so the next client gets the slot now.
    nextone = await asyncio.wait_for(connect(proxy), 10)
    assert await nextone.fetchval("select 1") == 1
    await nextone.close()
    await observer.close()
    query_task.cancel()
    await asyncio.gather(query_task, return_exceptions=True)


def relayed_by(proxy: Proxy, kind: str) -> None:
    """Every relayed session of `proxy` is on the relay the test asked for."""
    expected = SocketRelay if kind == "sockets" else Relay
    relays = [s.relay for s in proxy.sessions if s.relay is not None]
    assert relays and all(type(r) is expected for r in relays), relays


async def wait_until_async(conn: asyncpg.Connection, sql: str, expected: Any, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while (value := await conn.fetchval(sql)) != expected:
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"{sql!r} gave {value!r}, expected {expected!r}")
        await asyncio.sleep(0.01)  # wait_until poll interval


# -- relaying ------------------------------------------------------------------------------------


async def test_a_server_fatal_reaches_the_client_before_the_close(
        pg: Cluster, proxy_factory: Any, relay_kind: str) -> None:
    proxy = await proxy_factory(pg)

    async def terminated_mid_query(conn: asyncpg.Connection) -> BaseException:
        pid = await conn.fetchval("select pg_backend_pid()")
        running = asyncio.create_task(conn.fetchval("select pg_sleep(30)"))
        admin = await asyncpg.connect(pg.dsn())
        await wait_until_async(admin, f"select state from pg_stat_activity where pid = {pid}", "active")
        assert await admin.fetchval("select pg_terminate_backend($1)", pid)
        await admin.close()
        with pytest.raises(asyncpg.PostgresError) as ended:
            await running
        return ended.value

    direct = await terminated_mid_query(await asyncpg.connect(pg.dsn("app")))
    conn = await connect(proxy)
    relayed_by(proxy, relay_kind)
    proxied = await terminated_mid_query(conn)
    assert type(proxied) is type(direct) and str(proxied) == str(direct)
    assert "terminating connection due to administrator command" in str(proxied)
    assert isinstance(proxied.__cause__, asyncpg.AdminShutdownError)  # the server's 57P01
    await wait_until(lambda: not admission(proxy).holders, "the slot to come back")


async def test_a_client_that_stops_reading_pauses_the_server_not_the_proxy_memory(
        pg: Cluster, proxy_factory: Any, relay_kind: str) -> None:
    proxy = await proxy_factory(pg)
    raw = await RawClient.connect(**at(proxy))
    raw.send_startup()
    await raw.read_until("Z")
    raw.writer.transport.pause_reading()  # the client reads nothing more
    raw.send(query("select repeat('x', 1000) from generate_series(1, 50000)"))  # ~50 MB
    [session] = proxy.sessions
    relay = session.relay
    if relay_kind == "sockets":
        await wait_until(lambda: not relay.server.reading, "the proxy to stop reading the server")
        buffered = relay.client.buffered
    else:
        await wait_until(lambda: not relay.server.is_reading(), "the proxy to stop reading the server")
        buffered = relay.client.get_write_buffer_size()
    assert buffered < 2 * 1024 * 1024, f"{buffered} bytes buffered for a client that does not read"
    raw.writer.transport.resume_reading()
    rows = 0
    while (msg := await raw.read_message()) is not None and msg[0] != "Z":
        rows += msg[0] == "D"
    assert rows == 50000
    raw.send(TERMINATE)


async def test_both_sockets_of_a_session_have_tcp_nodelay(
        pg: Cluster, proxy_factory: Any, relay_kind: str) -> None:
    import socket

    proxy = await proxy_factory(pg)
    conn = await connect(proxy)
    [session] = proxy.sessions
    for side in (session.relay.client, session.relay.server):
        if relay_kind == "sockets":
            with socket.socket(fileno=os.dup(side.fd)) as sock:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        else:
            sock = side.get_extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    await conn.close()


async def test_a_finished_session_is_freed_without_the_garbage_collector(
        pg: Cluster, proxy_factory: Any, relay_kind: str) -> None:
    """Its objects go when it ends, whatever the ending: none is left for a collection."""
    proxy = await proxy_factory(pg, admission={"max_backend_slots": 1, "queue_timeout": 0.3})
    crowded = await proxy_factory(pg, proxy={"max_clients": 1})
    nowhere = await proxy_factory(None, backend={"host": "127.0.0.1", "port": free_port()},
                                  admission={"queue_timeout": 0.3})
    gc.collect()
    gc.disable()
    try:
        conn = await connect(proxy)  # relayed, then closed by the client
        relayed_by(proxy, relay_kind)
        assert await conn.fetchval("select 1") == 1
        ghost = await RawClient.connect(**at(proxy))  # hangs up while it waits
        ghost.send_startup(application_name="ghost")
        await wait_until(lambda: admission(proxy).waiting == 1, "the ghost waiting")
        ghost.close()
        with pytest.raises(asyncpg.TooManyConnectionsError):
            await connect(proxy)  # refused at the queue deadline
        await conn.close()
        code, out, _ = await psql(proxy, "select 2")  # libpq's session, ended by Terminate
        assert (code, out.strip()) == (0, "2")
        raw = await RawClient.connect(**at(proxy))  # refused for a malformed packet
        raw.send(b"GET / HTTP/1.1\r\n\r\n")
        assert (await raw.read_error_then_eof())["C"] == "08P01"
        with pytest.raises(asyncpg.ConnectionFailureError) as unreachable:
            await connect(nowhere)  # retried until the queue deadline
        assert unreachable.value.sqlstate == "08006"
        first = await connect(crowded)
        over = await RawClient.connect(**at(crowded))  # over max_clients, and sends garbage
        over.send(b"GET / HTTP/1.1\r\n\r\n")
        assert (await over.read_error_then_eof())["C"] == "53300"
        await first.close()
        for p in (proxy, crowded, nowhere):
            await wait_until(lambda p=p: not p.sessions, "every session to end")
        kinds = tuple(k for k in (Session, Relay, SocketRelay, relay.Conduit) if k is not None)
        left = [o for o in gc.get_objects() if isinstance(o, kinds)]
        assert left == [], f"{len(left)} sessions or relays wait for the garbage collector"
    finally:
        gc.enable()


async def test_an_error_while_closing_a_session_leaves_it_uncounted(
        pg: Cluster, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    proxy = await proxy_factory(pg, proxy={"max_clients": 1})

    def broken(self: Session) -> None:
        raise RuntimeError("broken cleanup")

    monkeypatch.setattr(Session, "_cleanup", broken)
    conn = await connect(proxy)
    await conn.close()
    await wait_until(lambda: not proxy.sessions, "the session to be let go")
    assert "internal error while closing the session" in caplog.text
    monkeypatch.undo()
    conn = await connect(proxy)  # its max_clients place was given back
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    await asyncio.wait_for(proxy.shutdown(), 10)

"""TLS both ways, with real clients (psql, asyncpg) and a CA made here."""

from __future__ import annotations

import asyncio
import logging
import ssl
import struct
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from slotproxy import wire
from slotproxy.cluster import Cluster
from slotproxy.server import Proxy

from .conftest import ALICE_PASSWORD, HBA, PROXY_CLOSE_TIMEOUT, wait_until
from .pgraw import RawClient
from .tlsfiles import CA

SSL_REQUEST = struct.pack("!ii", 8, wire.SSL_REQUEST_CODE)


@pytest.fixture
def ca(tmp_path: Path) -> CA:
    return CA.make(tmp_path)


@pytest.fixture
def proxy_cert(ca: CA, tmp_path: Path) -> tuple[Path, Path]:
    cert, key, _, _ = ca.issue(tmp_path, "proxy")
    return cert, key


@pytest.fixture
def tls_server(cluster_factory: Any, ca: CA, tmp_path: Path) -> Cluster:
    """A server with ssl = on; alice authenticates with SCRAM."""
    _, _, cert, key = ca.issue(tmp_path, "server")
    hba = HBA.replace("host ", "hostssl ", 1) + "hostnossl all all 127.0.0.1/32 trust\n"
    return cluster_factory(files={"server.crt": cert, "server.key": key}, hba=hba,
                           settings={"ssl": "on", "ssl_cert_file": "'server.crt'",
                                     "ssl_key_file": "'server.key'"})


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


async def psql(proxy: Proxy, sql: str, conninfo: str, password: str | None = None) -> tuple[int, str]:
    a = proxy.addresses[0]
    env = {"PATH": "/usr/bin:/bin:/usr/local/bin", "PGCONNECT_TIMEOUT": "10"}
    if password:
        env["PGPASSWORD"] = password
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-w", "-At", f"host={a.host} port={a.port} dbname=postgres {conninfo}", "-c", sql,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env)
    out, _ = await proc.communicate()
    return proc.returncode, out.decode().strip()


SSL_ON_SERVER = "select ssl from pg_stat_ssl where pid = pg_backend_pid()"


def verify_full(ca: CA) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(ca.path))
    context.check_hostname = True
    return context


@pytest.mark.parametrize("server_tls", [False, True], ids=["server-plain", "server-tls"])
async def test_clients_with_require_and_verify_full(
        pg: Cluster, tls_server: Cluster, proxy_factory: Any, ca: CA, proxy_cert: tuple[Path, Path],
        server_tls: bool) -> None:
    server = tls_server if server_tls else pg
    backend = {"sslmode": "verify-full", "sslrootcert": str(ca.path)} if server_tls else {}
    cert, key = proxy_cert
    proxy = await proxy_factory(server, backend=backend, tls={
        "client_tls": "require", "cert_file": str(cert), "key_file": str(key)})
    leg = "t" if server_tls else "f"

    for conninfo in ("user=app sslmode=require", f"user=app sslmode=verify-full sslrootcert={ca.path}"):
        code, out = await psql(proxy, SSL_ON_SERVER, conninfo)
        assert (code, out) == (0, leg), out
    for ssl_arg in ("require", verify_full(ca)):
        conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl=ssl_arg)
        assert await conn.fetchval(SSL_ON_SERVER) is server_tls
        assert conn._transport.get_extra_info("ssl_object") is not None  # the client's leg is TLS
        await conn.close()


async def test_require_refuses_a_plain_text_client_with_28000(
        pg: Cluster, proxy_factory: Any, proxy_cert: tuple[Path, Path], caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    cert, key = proxy_cert
    proxy = await proxy_factory(pg, tls={"client_tls": "require", "cert_file": str(cert),
                                         "key_file": str(key)})
    with pytest.raises(asyncpg.InvalidAuthorizationSpecificationError) as refused:
        await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl=False)
    assert refused.value.sqlstate == "28000"
    assert "slotproxy requires TLS" in str(refused.value)
    assert "refused (tls_required): slotproxy requires TLS" in caplog.text
    code, out = await psql(proxy, "select 1", "user=app sslmode=disable")
    assert code == 2 and "FATAL:  slotproxy requires TLS" in out


async def test_allow_serves_both(pg: Cluster, proxy_factory: Any, proxy_cert: tuple[Path, Path]) -> None:
    cert, key = proxy_cert
    proxy = await proxy_factory(pg, tls={"client_tls": "allow", "cert_file": str(cert), "key_file": str(key)})
    assert (await psql(proxy, "select 1", "user=app sslmode=disable"))[0] == 0
    assert (await psql(proxy, "select 1", "user=app sslmode=require"))[0] == 0


async def test_direct_tls_with_alpn(pg: Cluster, proxy_factory: Any, ca: CA,
                                   proxy_cert: tuple[Path, Path], caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    cert, key = proxy_cert
    proxy = await proxy_factory(pg, tls={"client_tls": "require", "cert_file": str(cert),
                                         "key_file": str(key)})
    context = verify_full(ca)
    context.set_alpn_protocols(["postgresql"])  # as PostgreSQL 17's libpq does
    conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl=context,
                                 direct_tls=True)  # TLS from the first byte, no SSLRequest
    assert await conn.fetchval("select 1") == 1
    await conn.close()
    # Without ALPN a direct-TLS client is turned away, as PostgreSQL 17 does.
    with pytest.raises((ConnectionError, asyncpg.ConnectionDoesNotExistError, ssl.SSLError)):
        await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl=verify_full(ca),
                              direct_tls=True)
    assert "direct TLS without ALPN 'postgresql': closed" in caplog.text
    conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl=context,
                                 direct_tls=True)  # and the proxy serves on
    assert await conn.fetchval("select 1") == 1
    await conn.close()


async def test_shutdown_cancels_the_running_query_of_a_tls_client(
        pg: Cluster, proxy_factory: Any, proxy_cert: tuple[Path, Path]) -> None:
    # A TLS client's session is relayed on transports, whose losses are told in another
    # order than a plain socket's: the cancel must not depend on it.
    cert, key = proxy_cert
    proxy = await proxy_factory(pg, proxy={"shutdown_timeout": 0.5}, tls={
        "client_tls": "require", "cert_file": str(cert), "key_file": str(key)})
    busy = await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl="require")
    query = asyncio.create_task(busy.execute("select pg_sleep(60)"))
    sleeping = "select count(*) from pg_stat_activity where query = 'select pg_sleep(60)'"
    await wait_until(lambda: pg.psql(sleeping) == "1", "the query to run")
    await asyncio.wait_for(proxy.shutdown(), 30)
    with pytest.raises((asyncpg.ConnectionDoesNotExistError, ConnectionError)):
        await query
    await wait_until(lambda: pg.psql(sleeping) == "0", "the backend to stop its query")
    assert "canceling statement due to user request" in pg.log_text()


async def test_bytes_after_sslrequest_before_the_answer_are_refused(
        pg: Cluster, proxy_factory: Any, proxy_cert: tuple[Path, Path]) -> None:
    cert, key = proxy_cert
    proxy = await proxy_factory(pg, tls={"client_tls": "allow", "cert_file": str(cert),
                                         "key_file": str(key)})
    raw = await RawClient.connect(**at(proxy))
    # A startup packet injected behind the SSLRequest would pass for encrypted (CVE-2021-23214).
    raw.send(SSL_REQUEST + wire.encode_startup({"user": "app"}))
    fields = await raw.read_error_then_eof()
    assert (fields["C"], fields["M"]) == ("08P01", "received unencrypted data after SSL request")


async def test_scram_over_tls_both_ways_with_default_channel_binding(
        tls_server: Cluster, proxy_factory: Any, tmp_path: Path) -> None:
    # The proxy shows clients the server's own certificate (the README says why): the
    # client's channel binding to it is what the server checks, end to end.
    proxy = await proxy_factory(tls_server, backend={"sslmode": "require"}, tls={
        "client_tls": "require", "cert_file": str(tmp_path / "server.crt"),
        "key_file": str(tmp_path / "server.key")})
    for binding in ("", "channel_binding=prefer", "channel_binding=require"):  # "" is libpq's default
        code, out = await psql(proxy, "select current_user", f"user=alice sslmode=require {binding}",
                               ALICE_PASSWORD)
        assert (code, out) == (0, "alice"), (binding, out)
    conn = await asyncpg.connect(**at(proxy), user="alice", password=ALICE_PASSWORD,
                                 database="postgres", ssl="require")
    assert await conn.fetchval(SSL_ON_SERVER) is True
    await conn.close()


async def test_with_a_certificate_of_its_own_the_proxy_drops_scram_plus(
        tls_server: Cluster, proxy_factory: Any, proxy_cert: tuple[Path, Path]) -> None:
    cert, key = proxy_cert
    proxy = await proxy_factory(tls_server, backend={"sslmode": "require"}, tls={
        "client_tls": "require", "cert_file": str(cert), "key_file": str(key)})
    # Drivers that do not insist on channel binding get in once PLUS is not offered.
    conn = await asyncpg.connect(**at(proxy), user="alice", password=ALICE_PASSWORD,
                                 database="postgres", ssl="require")
    assert await conn.fetchval("select current_user") == "alice"
    await conn.close()
    code, out = await psql(proxy, "select current_user", "user=alice sslmode=require channel_binding=disable",
                           ALICE_PASSWORD)
    assert (code, out) == (0, "alice"), out
    # libpq (channel_binding=prefer) then says "I could bind but you cannot", which the
    # server, itself on TLS, refuses as a downgrade. The README says what to do instead.
    code, out = await psql(proxy, "select 1", "user=alice sslmode=require", ALICE_PASSWORD)
    assert code == 2 and "SCRAM channel binding negotiation error" in out


@pytest.mark.parametrize(("client_tls", "sslmode"), [("disable", "prefer"), ("allow", "require"),
                                                  ("passthrough", "prefer")])
async def test_a_plain_text_libpq_client_logs_in_with_scram_when_the_server_is_on_tls(
        tls_server: Cluster, proxy_factory: Any, proxy_cert: tuple[Path, Path], client_tls: str,
        sslmode: str) -> None:
    # ssl = on is the default of Debian's and Ubuntu's packages. The server offers
    # SCRAM-SHA-256-PLUS on its TLS connection with the proxy; libpq on plain text
    # refuses a server that offers it ("... over a non-SSL connection").
    cert, key = proxy_cert
    tls = {"client_tls": client_tls}
    if client_tls == "allow":
        tls.update(cert_file=str(cert), key_file=str(key))
    proxy = await proxy_factory(tls_server, backend={"sslmode": sslmode}, tls=tls)
    code, out = await psql(proxy, f"{SSL_ON_SERVER}; select current_user", "user=alice sslmode=disable",
                           ALICE_PASSWORD)
    assert (code, out) == (0, "t\nalice"), out


async def psql_direct(cluster: Cluster, sql: str, conninfo: str, password: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-w", "-At", f"host={cluster.host} port={cluster.port} dbname=postgres {conninfo}",
        "-c", sql, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "PGPASSWORD": password})
    out, _ = await proc.communicate()
    return proc.returncode, out.decode().strip()


async def test_passthrough_keeps_tls_and_channel_binding_end_to_end(
        tls_server: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(tls_server, tls={"client_tls": "passthrough"},
                                admission={"max_backend_slots": 1})
    code, out = await psql(proxy, "select current_user",
                           "user=alice sslmode=require channel_binding=require", ALICE_PASSWORD)
    assert (code, out) == (0, "alice"), out
    # Held by the server's budget like anyone: one slot, so the second waits for the first.
    first = await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl="require")
    second = asyncio.create_task(asyncpg.connect(**at(proxy), user="app", database="postgres",
                                                 ssl="require"))
    from .conftest import wait_until
    await wait_until(lambda: proxy.gate.admission.waiting == 1, "the second held by the budget")
    assert {s.state for s in proxy.sessions if s.relay} == {wire.PASSTHROUGH}
    await first.close()
    conn = await second
    assert await conn.fetchval(SSL_ON_SERVER) is True
    await conn.close()


async def test_passthrough_answers_N_when_the_server_has_no_tls(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, tls={"client_tls": "passthrough"})
    raw = await RawClient.connect(**at(proxy))
    raw.send(SSL_REQUEST)
    assert await raw.reader.readexactly(1) == b"N"
    code, out = await psql(proxy, "select 1", "user=app sslmode=prefer")
    assert (code, out) == (0, "1")


async def test_a_burst_of_passthrough_clients_asks_the_server_about_tls_once(
        tls_server: Cluster, proxy_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from slotproxy import backend

    asked = []
    real_probe = backend.probe_tls

    async def counted(*args: Any) -> bool | None:
        asked.append(args)
        return await real_probe(*args)

    monkeypatch.setattr(backend, "probe_tls", counted)
    proxy = await proxy_factory(tls_server, tls={"client_tls": "passthrough"})
    conns = await asyncio.gather(*(asyncpg.connect(**at(proxy), user="app", database="postgres",
                                                   ssl="require") for _ in range(6)))
    assert len(asked) == 1
    for conn in conns:
        assert await conn.fetchval(SSL_ON_SERVER) is True
        await conn.close()


async def test_reload_picks_up_new_certificate_files(
        pg: Cluster, ca: CA, tmp_path: Path) -> None:
    from slotproxy import config

    cert, key, _, _ = ca.issue(tmp_path, "first")
    path = tmp_path / "p.toml"
    path.write_text(f'[proxy]\nlisten = "127.0.0.1:0"\n[backend]\nhost = "{pg.host}"\nport = {pg.port}\n'
                    f'[tls]\nclient_tls = "allow"\ncert_file = "{cert}"\nkey_file = "{key}"\n')
    proxy = Proxy(config.load(str(path)), path=str(path))
    await proxy.start()
    try:
        async def served_cert() -> str:
            conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", ssl="require")
            der = conn._transport.get_extra_info("ssl_object").getpeercert(binary_form=True)
            await conn.close()
            return der

        before = await served_cert()
        _, _, new_cert, new_key = ca.issue(tmp_path, "second")
        cert.write_bytes(new_cert)
        key.write_bytes(new_key)
        await proxy.control("reload")
        after = await served_cert()
        assert before != after
        assert ssl.DER_cert_to_PEM_cert(after).strip() == new_cert.decode().strip()
    finally:
        await asyncio.wait_for(proxy.abort(), PROXY_CLOSE_TIMEOUT)  # a leak fails, not hangs

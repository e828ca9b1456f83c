"""Seeing and steering the proxy: metrics, status, health, the console, reload, pause."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from slotproxy import config
from slotproxy.cluster import Cluster
from slotproxy.metrics import Stats, wait_histogram
from slotproxy.scram import Verifier
from slotproxy.server import Proxy

from .conftest import PROXY_CLOSE_TIMEOUT, wait_until
from .pgraw import RawClient

OPS_PASSWORD = "correct horse battery staple"


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


async def http_get(proxy: Proxy, path: str) -> tuple[int, str]:
    url = f"http://{proxy.admin.address}{path}"

    def get() -> tuple[int, str]:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, get)


async def metrics(proxy: Proxy) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = await http_get(proxy, "/metrics")
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return found


def total(values: dict, name: str, **labels: str) -> float:
    return sum(v for (n, ls), v in values.items()
               if n == name and all(dict(ls).get(k) == want for k, want in labels.items()))


async def client(proxy: Proxy, hold: float, app: str = "burst") -> str | None:
    """Connect, hold the session, close: None when it went well, else the SQLSTATE seen."""
    try:
        conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", timeout=60,
                                     server_settings={"application_name": app})
    except asyncpg.PostgresError as e:
        return e.sqlstate
    await conn.execute("select pg_sleep($1)", hold)
    await conn.close()
    return None


ADMIN = {"listen": "127.0.0.1:0"}


async def test_metrics_follow_a_burst(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=ADMIN, admission={"max_backend_slots": 3, "max_queue": 20,
                                                            "queue_timeout": 30})
    burst = [asyncio.create_task(client(proxy, hold=0.2)) for _ in range(30)]
    peak = 0.0
    while not all(t.done() for t in burst):
        peak = max(peak, total(await metrics(proxy), "slotproxy_clients_waiting"))
    seen = [t.result() for t in burst]
    after = await metrics(proxy)

    assert peak > 0, "the scrapes saw clients waiting"
    assert total(after, "slotproxy_clients_waiting") == 0
    admitted = seen.count(None)
    assert admitted + seen.count("53300") == 30
    assert total(after, "slotproxy_admission_wait_seconds_count") == admitted
    assert total(after, "slotproxy_admission_wait_seconds_bucket", le="+Inf") == admitted
    # 30 clients for 8 slots, each held 0.2 s: the first were let in at once, the rest waited.
    assert 0 < total(after, "slotproxy_admission_wait_seconds_bucket", le="0.1") < admitted
    assert total(after, "slotproxy_clients_admitted_total") == admitted
    assert total(after, "slotproxy_clients_refused_total", reason="queue_full", sqlstate="53300") \
        == seen.count("53300") > 0
    assert total(after, "slotproxy_bytes_relayed_total", direction="to_client") > 0
    assert total(after, "slotproxy_capacity") == 3


def test_the_wait_histogram_counts_a_wait_on_a_bound_in_that_bucket() -> None:
    stats = Stats()
    for waited in (0.0, 0.001, 0.0010001, 200.0):
        stats.admit("db:5432", "web", waited)
    family = wait_histogram(stats)
    buckets = {s.labels["le"]: s.value for s in family.samples if s.name.endswith("_bucket")}
    assert (buckets["0.001"], buckets["0.005"], buckets["120.0"], buckets["+Inf"]) == (2, 3, 3, 4)
    assert [s.value for s in family.samples if s.name.endswith("_sum")] == [200.0020001]


async def test_status_lists_a_waiting_client(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=ADMIN, admission={"max_backend_slots": 1})
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    waiting = asyncio.create_task(client(proxy, hold=0, app="nightly-report"))
    await wait_until(lambda: proxy.gate.admission.waiting == 1, "a client waiting")

    code, body = await http_get(proxy, "/status")
    status = json.loads(body)
    assert code == 200
    [waiter] = status["waiting"]
    assert (waiter["user"], waiter["database"], waiter["application_name"], waiter["class"]) == \
        ("app", "postgres", "nightly-report", "default")
    assert waiter["waited"] >= 0
    [session] = status["sessions"]
    assert session["state"] == "idle" and session["backend_pid"] > 0
    assert status["servers"][0]["own"] == 1 and status["servers"][0]["waiting"] == 1

    await holder.close()
    assert await waiting is None


async def test_status_lists_waiters_in_the_order_they_will_be_served(
        pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=ADMIN, admission={"max_backend_slots": 1})
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    crowd = [await RawClient.connect(**at(proxy)) for _ in range(8)]
    for raw in crowd:  # in one go: they queue within the same millisecond or so
        raw.send_startup()
    await wait_until(lambda: proxy.gate.admission.waiting == 8, "eight clients waiting")
    queue = [ticket.info.id for ticket in proxy.gate.admission.waiters()]
    code, body = await http_get(proxy, "/status")
    assert code == 200 and [w["id"] for w in json.loads(body)["waiting"]] == queue
    for raw in crowd:
        raw.close()
    await holder.close()


async def test_health_never_touches_the_server_and_ready_does(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=ADMIN)
    assert await http_get(proxy, "/health") == (200, "ok\n")
    code, body = await http_get(proxy, "/ready")
    assert code == 200 and json.loads(body)["ready"] is True

    await asyncio.get_running_loop().run_in_executor(None, pg.stop)
    assert await http_get(proxy, "/health") == (200, "ok\n")
    code, body = await http_get(proxy, "/ready")
    assert code == 503 and "not reachable" in json.loads(body)["reasons"][0]
    assert (await http_get(proxy, "/nope"))[0] == 404


# -- the console ---------------------------------------------------------------------------------


def console_admin() -> dict[str, Any]:
    return {"users": {"ops": str(Verifier.make(OPS_PASSWORD))}}


async def psql(proxy: Proxy, sql: str, password: str = OPS_PASSWORD, user: str = "ops") -> tuple[int, str]:
    a = proxy.addresses[0]
    proc = await asyncio.create_subprocess_exec(
        "psql", "-X", "-w", "-h", a.host, "-p", str(a.port), "-U", user, "-d", "slotproxy", "-c", sql,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        env={"PATH": "/usr/bin:/bin:/usr/local/bin", "PGPASSWORD": password})
    out, _ = await proc.communicate()
    return proc.returncode, out.decode()


async def test_console_shows_rows_psql_prints(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=console_admin(), admission={"max_backend_slots": 1})
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    waiting = asyncio.create_task(client(proxy, hold=0, app="etl"))
    await wait_until(lambda: proxy.gate.admission.waiting == 1, "a client waiting")
    server = f"127.0.0.1:{pg.port}"

    code, out = await psql(proxy, "SHOW QUEUE")
    assert code == 0 and "etl" in out and "(1 row)" in out
    code, out = await psql(proxy, "show sessions;")
    assert code == 0 and " idle " in out and "(1 row)" in out
    code, out = await psql(proxy, "SHOW CAPACITY")
    assert code == 0 and server in out and "(1 row)" in out
    code, out = await psql(proxy, "SHOW CLASSES")
    assert code == 0 and "default" in out
    code, out = await psql(proxy, "SHOW CONFIG")
    assert code == 0 and "admission.max_backend_slots" in out and "SCRAM-SHA-256$" not in out
    code, out = await psql(proxy, "DROP TABLE x")
    assert code == 1 and "unknown slotproxy console command" in out
    assert len(proxy.gate.admission.holders) == 1, "the console never takes a server slot"

    await holder.close()
    assert await waiting is None


async def test_console_refuses_a_wrong_password_with_28P01(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=console_admin())
    for user in ("ops", "nobody"):  # a wrong password and an unknown user look alike
        code, out = await psql(proxy, "SHOW QUEUE", password="wrong", user=user)
        assert code == 2 and f'FATAL:  password authentication failed for user "{user}"' in out
    with pytest.raises(asyncpg.InvalidPasswordError) as refused:
        await asyncpg.connect(**at(proxy), user="ops", password="wrong", database="slotproxy")
    assert refused.value.sqlstate == "28P01"


def sasl_initial(mechanism: bytes, data: bytes) -> bytes:
    body = mechanism + b"\0" + struct.pack("!i", len(data)) + data
    return b"p" + struct.pack("!i", 4 + len(body)) + body


async def console_salt(proxy: Proxy, user: str) -> str:
    """The salt the console's SCRAM exchange offers `user`."""
    raw = await RawClient.connect(**at(proxy))
    raw.send_startup(user=user, database="slotproxy")
    mtype, body = await raw.read_message()
    assert mtype == "R" and body[:4] == struct.pack("!i", 10)  # AuthenticationSASL
    raw.send(sasl_initial(b"SCRAM-SHA-256", b"n,,n=,r=0123456789abcdef"))
    mtype, body = await raw.read_message()
    assert mtype == "R" and body[:4] == struct.pack("!i", 11)  # AuthenticationSASLContinue
    raw.close()
    return dict(part.split("=", 1) for part in body[4:].decode().split(","))["s"]


async def test_console_salts_do_not_tell_which_users_exist(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=console_admin())
    real = await console_salt(proxy, "ops")
    [(_, verifier)] = proxy.config.admin.users
    assert real == base64.b64encode(Verifier.parse(verifier).salt).decode()
    assert await console_salt(proxy, "ops") == real
    ghost = await console_salt(proxy, "ghost")
    assert await console_salt(proxy, "ghost") == ghost, "an unknown user's salt stays, as a real one's"
    assert len({real, ghost, await console_salt(proxy, "other-ghost")}) == 3


@pytest.mark.parametrize(("mechanism", "first"), [(b"\xff\xfe", b"n,,n=,r=x"),
                                                  (b"SCRAM-SHA-256", "n,,n=,r=é".encode())],
                         ids=["mechanism not UTF-8", "nonce not ASCII"])
async def test_console_refuses_a_malformed_exchange_as_a_failed_login(
        pg: Cluster, proxy_factory: Any, mechanism: bytes, first: bytes) -> None:
    proxy = await proxy_factory(pg, admin=console_admin())
    raw = await RawClient.connect(**at(proxy))
    raw.send_startup(user="ops", database="slotproxy")
    await raw.read_message()
    raw.send(sasl_initial(mechanism, first))
    error = await raw.read_error_then_eof()
    assert error["C"] == "28P01" and error["M"] == 'password authentication failed for user "ops"'


async def test_pause_holds_new_clients_and_resume_releases_them(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, admin=console_admin())
    live = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    # Without [databases] every name reaches the one server: the answer says which it paused.
    server = f"{pg.host}:{pg.port}"
    assert await psql(proxy, "PAUSE postgres") == (0, f'NOTICE:  paused admission to {server} (database '
                                                     '"postgres" has no [databases] entry of its own: its '
                                                     'server is the catch-all one)\nPAUSE\n')
    held = [asyncio.create_task(client(proxy, hold=0)) for _ in range(5)]
    await wait_until(lambda: proxy.gate.admission.waiting == 5, "five clients held by the pause")
    assert await live.fetchval("select 1") == 1, "a live session goes on during a pause"
    assert await psql(proxy, "RESUME") == (0, f"NOTICE:  resumed admission to {server}\nRESUME\n")
    assert await asyncio.gather(*held) == [None] * 5
    await live.close()


async def test_console_reload_applies_a_new_file(pg: Cluster, tmp_path: Path) -> None:
    path = tmp_path / "slotproxy.toml"
    text = (f'[proxy]\nlisten = "127.0.0.1:0"\n[backend]\nhost = "{pg.host}"\nport = {pg.port}\n'
            f'[admin]\ntrust_loopback = true\n[admission]\nmax_backend_slots = 1\n')
    path.write_text(text)
    proxy = Proxy(config.load(str(path)), path=str(path))
    await proxy.start()
    try:
        holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
        waiting = asyncio.create_task(client(proxy, hold=0))
        await wait_until(lambda: proxy.gate.admission.waiting == 1, "a client waiting")
        path.write_text(text.replace("max_backend_slots = 1", "max_backend_slots = 2"))
        code, out = await psql(proxy, "RELOAD", user="anyone")
        assert code == 0 and "admission.max_backend_slots 1 -> 2" in out
        assert await asyncio.wait_for(waiting, 5) is None, "the larger limit admits the waiter at once"
        path.write_text(text.replace("max_backend_slots = 1", "max_backend_slots = 0"))
        code, out = await psql(proxy, "RELOAD", user="anyone")
        assert code == 1 and "admission.max_backend_slots: must be >= 1, got 0" in out
        assert proxy.config.admission.max_backend_slots == 2, "the running configuration stays"
        verifier = console_admin()["users"]["ops"]
        path.write_text(text.replace("max_backend_slots = 1", "max_backend_slots = 2")
                        + f'[admin.users]\nops = "{verifier}"\n')
        code, out = await psql(proxy, "RELOAD", user="anyone")
        assert code == 0 and 'admin.users {} -> { ops = "***" }' in out
        assert verifier.split("$")[2] not in out, "a verifier never leaves the proxy"
        assert await holder.fetchval("select 1") == 1
        await holder.close()
    finally:
        await asyncio.wait_for(proxy.abort(), PROXY_CLOSE_TIMEOUT)  # a leak fails, not hangs


async def test_reload_to_a_new_server_moves_waiters_there_and_keeps_the_pause(
        cluster_factory: Any, tmp_path: Path) -> None:
    old, new = cluster_factory(max_connections=10), cluster_factory(max_connections=10)
    path = tmp_path / "slotproxy.toml"
    text = ('[proxy]\nlisten = "127.0.0.1:0"\n[backend]\nhost = "127.0.0.1"\nport = {port}\n'
            '[admin]\ntrust_loopback = true\n[admission]\nmax_backend_slots = 1\n')
    path.write_text(text.format(port=old.port))
    proxy = Proxy(config.load(str(path)), path=str(path))
    await proxy.start()
    try:
        holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
        assert (await psql(proxy, "PAUSE", user="anyone"))[0] == 0
        waiter = asyncio.create_task(asyncpg.connect(**at(proxy), user="app", database="postgres",
                                                     timeout=30))
        await wait_until(lambda: proxy.gate.admission.waiting == 1, "a client waiting at the old server")
        path.write_text(text.format(port=new.port))
        code, out = await psql(proxy, "RELOAD", user="anyone")
        assert code == 0 and "[databases] routes changed" in out

        assert proxy.primary.address.port == new.port
        await wait_until(lambda: proxy.gate.admission.waiting == 1, "the waiter queued at the new server")
        assert proxy.gate.admission.paused, "the server that took over a paused one starts paused"
        assert not waiter.done()
        assert (await psql(proxy, "RESUME", user="anyone"))[0] == 0
        moved = await asyncio.wait_for(waiter, 10)
        assert await moved.fetchval("select current_setting('port')::int") == new.port
        assert await holder.fetchval("select current_setting('port')::int") == old.port, \
            "a session on the old server goes on"
        old_server = next(a for a in proxy.upstreams if a.port == old.port)
        assert proxy.upstreams[old_server].retired
        await holder.close()
        await wait_until(lambda: old_server not in proxy.upstreams, "the old server let go", timeout=5)
        await moved.close()
    finally:
        await asyncio.wait_for(proxy.abort(), PROXY_CLOSE_TIMEOUT)  # a leak fails, not hangs


async def test_a_client_refused_while_its_route_was_removed_leaves_no_trace(
        cluster_factory: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slotproxy import backend

    pg = cluster_factory(max_connections=3, superuser_reserved_connections=0)
    strangers = [await asyncpg.connect(host=pg.host, port=pg.port, user="app", database="postgres")
                 for _ in range(3)]  # the server is full, as the proxy will learn only by a refusal
    go = asyncio.Event()
    real_connect = backend.connect

    async def held_once(*args: Any, **kwargs: Any) -> Any:
        if not go.is_set():
            await go.wait()  # the reload lands while this startup is on its way
        return await real_connect(*args, **kwargs)

    monkeypatch.setattr(backend, "connect", held_once)
    path = tmp_path / "slotproxy.toml"
    route = f'host = "{pg.host}"\nport = {pg.port}\ndbname = "postgres"\n'
    text = ('[proxy]\nlisten = "127.0.0.1:0"\n[admission]\nmax_backend_slots = 2\nqueue_timeout = 10\n'
            f'[databases.bar]\n{route}')
    path.write_text(text + f'[databases.foo]\n{route}')
    proxy = Proxy(config.load(str(path)), path=str(path))
    await proxy.start()
    try:
        foo = asyncio.create_task(asyncpg.connect(**at(proxy), user="app", database="foo"))
        await wait_until(lambda: len(proxy.gate.admission.connecting) == 1, "foo's startup on its way")
        path.write_text(text)
        await proxy.reload()
        go.set()  # the full server refuses foo's startup
        with pytest.raises(asyncpg.InvalidCatalogNameError, match='no route for database "foo"'):
            await foo
        admission = proxy.gate.admission
        assert (admission.waiting, len(admission.holders)) == (0, 0), "foo left nothing behind"
        await strangers.pop().close()
        bar = await asyncpg.connect(**at(proxy), user="app", database="bar", timeout=10)
        assert await bar.fetchval("select 1") == 1
        await bar.close()
    finally:
        await asyncio.wait_for(proxy.abort(), PROXY_CLOSE_TIMEOUT)  # a leak fails, not hangs
        for conn in strangers:
            await conn.close()

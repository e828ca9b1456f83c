"""A proxy that holds under abuse: connection caps, silent sockets, running out of
file descriptors, cancel floods. The early-bytes bound is in test_edges.py."""

from __future__ import annotations

import asyncio
import logging
import re
import resource
import sys
from typing import Any

import asyncpg
import pytest

from slotproxy import wire
from slotproxy.cluster import Cluster, free_port
from slotproxy.server import Proxy

from .conftest import wait_until
from .pgraw import RawClient


def at(proxy: Proxy) -> dict[str, Any]:
    a = proxy.addresses[0]
    return {"host": a.host, "port": a.port}


async def test_max_clients_counts_everyone_and_refuses_the_next_with_53300(
        pg: Cluster, proxy_factory: Any, caplog: Any) -> None:
    caplog.set_level(logging.INFO, logger="slotproxy")
    proxy = await proxy_factory(pg, proxy={"max_clients": 5}, admission={"max_backend_slots": 1})
    holder = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    waiting = [asyncio.create_task(asyncpg.connect(**at(proxy), user="app", database="postgres"))
               for _ in range(2)]
    silent = [await RawClient.connect(**at(proxy)) for _ in range(2)]  # not a word yet: still counted
    await wait_until(lambda: len(proxy.sessions) == 5, "five client connections")

    with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
        await asyncpg.connect(**at(proxy), user="app", database="postgres")
    assert refused.value.sqlstate == "53300"
    assert "too many client connections: 5 open (proxy.max_clients)" in str(refused.value)
    assert "refused (too_many_clients): slotproxy: too many client connections: 5 open" in caplog.text

    silent.pop().close()
    await wait_until(lambda: len(proxy.sessions) == 4, "a place free")
    late = asyncio.create_task(asyncpg.connect(**at(proxy), user="app", database="postgres"))
    await wait_until(lambda: proxy.gate.admission.waiting == 3, "the late client accepted and queued")
    await holder.close()
    for task in (*waiting, late):  # each gets the one slot in turn
        await (await asyncio.wait_for(task, 10)).close()
    silent.pop().close()


async def test_the_per_address_cap(pg: Cluster, proxy_factory: Any) -> None:
    proxy = await proxy_factory(pg, proxy={"max_clients_per_address": 2})
    first = [await asyncpg.connect(**at(proxy), user="app", database="postgres") for _ in range(2)]
    with pytest.raises(asyncpg.TooManyConnectionsError) as refused:
        await asyncpg.connect(**at(proxy), user="app", database="postgres")
    assert "too many connections from 127.0.0.1: 2 open (proxy.max_clients_per_address)" in str(refused.value)
    await first.pop().close()
    await wait_until(lambda: proxy.per_address["127.0.0.1"] == 1, "a place free for this address")
    again = await asyncpg.connect(**at(proxy), user="app", database="postgres")
    for conn in (again, *first):
        await conn.close()


async def test_a_thousand_silent_sockets_delay_nobody_and_are_closed(
        pg: Cluster, proxy_factory: Any) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 2600:
        pytest.skip(f"needs 2,600 file descriptors here, the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2600), hard))
    connects: list[asyncio.Task[RawClient]] = []
    try:
        # startup_timeout leaves the swarm time to be accepted whole on a slow machine.
        proxy = await proxy_factory(pg, proxy={"startup_timeout": 5})
        connects = [asyncio.create_task(RawClient.connect(**at(proxy))) for _ in range(1000)]
        swarm = await asyncio.gather(*connects)
        await wait_until(lambda: len(proxy.sessions) == 1000, "the swarm accepted")

        conn = await asyncpg.connect(**at(proxy), user="app", database="postgres", timeout=5)
        assert await conn.fetchval("select 1") == 1  # a real client gets through meanwhile
        await conn.close()

        closed = await asyncio.gather(*(raw.read_eof(timeout=20) for raw in swarm))
        assert closed == [b""] * 1000, "each silent socket closed at startup_timeout, without a word"
        await wait_until(lambda: not proxy.sessions, "no session left")
    finally:
        for task in connects:  # also those connected when another failed
            if not task.done():
                task.cancel()
            elif not task.cancelled() and task.exception() is None:
                task.result().close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_running_out_of_file_descriptors_pauses_accepting_and_recovers(
        pg: Cluster, tmp_path: Any) -> None:
    port = free_port()
    # The proxy runs with a hard limit of 64 descriptors, which it cannot raise.
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "from slotproxy.cli import main; sys.exit(main())")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", code, "run", "--listen", f"127.0.0.1:{port}", "--backend",
        f"{pg.host}:{pg.port}", stderr=asyncio.subprocess.PIPE)
    lines: list[str] = []

    async def read_log() -> None:
        async for raw in proc.stderr:  # type: ignore[union-attr]
            lines.append(raw.decode())

    reader = asyncio.create_task(read_log())
    try:
        await wait_until(lambda: any("listening on" in line for line in lines), "the proxy to listen")
        # More silent clients than it has descriptors for.
        swarm = await asyncio.gather(*(RawClient.connect("127.0.0.1", port) for _ in range(100)))
        await wait_until(lambda: any("out of file descriptors" in line for line in lines),
                         "the proxy to notice it ran out", timeout=20)
        # A real client, queued in the backlog behind them, gets in once they time out.
        conn = await asyncpg.connect(host="127.0.0.1", port=port, user="app", database="postgres",
                                     timeout=30)
        assert await conn.fetchval("select 1") == 1
        await conn.close()
        for raw in swarm:
            raw.close()
        assert proc.returncode is None, "the proxy serves on"
        assert any(re.search(r"file descriptor limit 64, but proxy.max_clients", line) for line in lines)
    finally:
        proc.terminate()
        await proc.wait()
        await reader


async def test_a_cancel_flood_is_rate_limited(pg: Cluster, proxy_factory: Any, caplog: Any) -> None:
    proxy = await proxy_factory(pg, proxy={"cancel_rate": 5})
    floods = [await RawClient.connect(**at(proxy)) for _ in range(40)]
    for raw in floods:
        raw.send(wire.encode_cancel(4242, b"flood"))
    await asyncio.gather(*(raw.read_eof() for raw in floods))
    assert proxy.cancels.dropped >= 30, "a burst of 5 passes, the rest is dropped"
    assert "cancel request dropped: more than 5 a second (proxy.cancel_rate)" in caplog.text


async def test_fuzzed_first_packets_leave_the_proxy_serving(pg: Cluster, proxy_factory: Any) -> None:
    from loadtest.fuzz import fuzz

    proxy = await proxy_factory(pg, proxy={"startup_timeout": 2}, admission={"max_backend_slots": 4})
    a = proxy.addresses[0]
    outcomes, ok, _ = await fuzz(a.host, a.port, f"postgresql://app@{a.host}:{a.port}/postgres",
                                 count=400, concurrency=8, seed=7, quiet=True)
    assert sum(outcomes.values()) == 400
    assert outcomes["ErrorResponse"] > 100 and not any(k.startswith("connect failed") for k in outcomes)
    assert ok, "a real client got through afterwards"
    await wait_until(lambda: not proxy.gate.admission.holders and not proxy.gate.admission.waiting,
                     "every slot and queue place given back")

"""relay.SocketRelay on socket pairs: flow control and every ending, without a server.

The sessions through a real server are in test_proxy (each ending on each relay);
here the two peers are plain sockets, so that a side can stop reading, or close,
exactly when the test says.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import select
import socket
import struct
import termios
from collections.abc import Iterator
from typing import Any

import pytest

from slotproxy import relay

from .conftest import wait_until

pytestmark = pytest.mark.skipif(relay.Conduit is None, reason="slotproxy._walker was not built")


class Pair:
    """A SocketRelay between an app socket and a server socket, as the proxy would hold it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, app_buffer: int = 0, server_buffer: int = 0,
                 **kwargs: Any) -> None:
        self.app, proxy_client = socket.socketpair()
        proxy_server, self.db = socket.socketpair()
        # A slow network to a side: the relay soon holds bytes for it.
        for sock, size in ((proxy_client, app_buffer), (proxy_server, server_buffer)):
            if size:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, size)
        for sock in (self.app, self.db):
            sock.setblocking(False)
        self.gone: list[str] = []
        self.fds = (proxy_client.detach(), proxy_server.detach())
        self.inodes = tuple(os.fstat(fd).st_ino for fd in self.fds)
        self.relay = relay.SocketRelay(loop, *self.fds, on_client_gone=lambda: self.gone.append("gone"),
                                       **kwargs)
        self.relay.start()

    def close(self) -> None:
        self.relay.close()
        self.app.close()
        self.db.close()


@pytest.fixture
def pair() -> Iterator[Any]:
    made: list[Pair] = []

    def make(**kwargs: Any) -> Pair:
        made.append(Pair(asyncio.get_running_loop(), **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


async def read_exactly(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while len(got) < n:
        chunk = await asyncio.wait_for(loop.sock_recv(sock, n - len(got)), 10)
        assert chunk, f"EOF after {len(got)} of {n} bytes"
        got += chunk
    return bytes(got)


async def read_to_eof(sock: socket.socket) -> bytes:
    loop = asyncio.get_running_loop()
    got = bytearray()
    while chunk := await asyncio.wait_for(loop.sock_recv(sock, 1 << 16), 10):
        got += chunk
    return bytes(got)


def unread(fd: int) -> int:
    """Bytes waiting to be read on `fd`."""
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0" * 4))[0]


def closed(fd: int, inode: int) -> bool:
    """Whether `fd` no longer refers to the socket `inode` (the number may be reused)."""
    try:
        return os.fstat(fd).st_ino != inode
    except OSError:
        return True


async def test_each_way_is_observed_counted_and_relayed_in_order(pair: Any) -> None:
    seen: list[tuple[str, bytes]] = []
    p = pair(client_observer=lambda d: seen.append(("client", d)),
             server_observer=lambda d: seen.append(("server", d)))
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(p.app, b"Q\x00\x00\x00\x05;")
    assert await read_exactly(p.db, 6) == b"Q\x00\x00\x00\x05;"
    await loop.sock_sendall(p.db, b"Z\x00\x00\x00\x05I")
    assert await read_exactly(p.app, 6) == b"Z\x00\x00\x00\x05I"
    assert b"".join(d for who, d in seen if who == "client") == b"Q\x00\x00\x00\x05;"
    assert b"".join(d for who, d in seen if who == "server") == b"Z\x00\x00\x00\x05I"
    assert (p.relay.bytes_to_server, p.relay.bytes_to_client) == (6, 6)
    p.relay.set_server_observer(None)
    await loop.sock_sendall(p.db, b"more")
    assert await read_exactly(p.app, 4) == b"more"
    assert len(seen) == 2 and p.relay.bytes_to_client == 10


async def test_an_app_that_stops_reading_stops_the_server_side_and_loses_nothing(pair: Any) -> None:
    p = pair()
    loop = asyncio.get_running_loop()
    payload = bytes(range(256)) * (32 * 1024)  # 8 MiB, far more than the socket buffers hold
    sending = asyncio.create_task(loop.sock_sendall(p.db, payload))
    await wait_until(lambda: not p.relay.server.reading, "the relay to stop reading the server")
    assert 0 < p.relay.client.buffered <= 256 * 1024  # at most one chunk held for the app
    assert not sending.done()  # the server is held back by its own socket
    assert await read_exactly(p.app, len(payload)) == payload
    await sending
    assert p.relay.server.reading and p.relay.client.buffered == 0


async def test_the_app_leaving_half_closes_the_server_side_and_waits_for_the_server(pair: Any) -> None:
    p = pair()
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(p.app, b"X\x00\x00\x00\x04")
    p.app.close()
    assert await read_to_eof(p.db) == b"X\x00\x00\x00\x04"  # the EOF came after what was sent
    assert p.gone == ["gone"]
    await asyncio.wait_for(p.relay.client_closed, 10)
    await loop.sock_sendall(p.db, b"late notice")  # read and dropped: nobody to take it
    await wait_until(lambda: unread(p.fds[1]) == 0, "the relay to read the late notice")
    assert not p.relay.server_closed.done()  # the server still holds the slot
    p.db.close()
    await asyncio.wait_for(p.relay.server_closed, 10)
    assert all(map(closed, p.fds, p.inodes))
    assert p.gone == ["gone"]


async def test_the_server_closing_first_sends_the_app_what_it_is_owed_then_closes(pair: Any) -> None:
    p = pair(app_buffer=4096)
    loop = asyncio.get_running_loop()
    fatal = b"E" + bytes(100_000)  # an error after a long result, then the server closes
    await loop.sock_sendall(p.db, fatal)
    p.db.close()
    await wait_until(lambda: p.relay.client.buffered > 0, "bytes held for the app")
    assert await read_to_eof(p.app) == fatal  # all of it, and only then the EOF
    await asyncio.wait_for(asyncio.gather(p.relay.server_closed, p.relay.client_closed), 10)
    assert p.gone == []  # the app did not leave a live session: nothing to cancel
    assert all(map(closed, p.fds, p.inodes))


async def test_closing_the_app_side_sends_what_is_owed_each_way_first(pair: Any) -> None:
    p = pair(app_buffer=4096)  # as a reclaimed idle session: an error to the app, Terminate to the server
    error = b"E" + os.urandom(300_000)  # more than the app's socket takes at once
    p.relay.to_client(error)
    p.relay.to_server(b"X\x00\x00\x00\x04")
    p.relay.close_client()
    assert p.relay.client.buffered > 0 and not p.relay.client_closed.done()
    assert await read_to_eof(p.app) == error
    assert await read_to_eof(p.db) == b"X\x00\x00\x00\x04"
    await asyncio.wait_for(p.relay.client_closed, 10)
    p.db.close()
    await asyncio.wait_for(p.relay.server_closed, 10)
    assert p.gone == ["gone"]


async def test_abort_client_drops_what_it_is_owed_and_closes_it_now(pair: Any) -> None:
    p = pair(app_buffer=4096)  # the server has closed; the app takes nothing (CLIENT_FLUSH_TIMEOUT)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(p.db, bytes(100_000))
    p.db.close()
    await wait_until(lambda: p.relay.client.buffered > 0, "bytes held for the app")
    p.relay.abort_client()
    assert p.relay.client_closed.done() and closed(p.fds[0], p.inodes[0])
    p.relay.close()  # the server's end, still unread behind the app's
    assert p.relay.server_closed.done() and all(map(closed, p.fds, p.inodes))


async def test_an_app_reset_with_bytes_owed_to_it_ends_its_side_and_half_closes_the_server(
        pair: Any) -> None:
    p = pair(app_buffer=4096)
    loop = asyncio.get_running_loop()
    await loop.sock_sendall(p.db, bytes(100_000))
    await wait_until(lambda: p.relay.client.buffered > 0, "bytes held for the app")
    p.app.close()  # with bytes unread: a reset for the relay's next send
    await asyncio.wait_for(p.relay.client_closed, 10)
    assert p.relay.client.buffered == 0 and p.gone == ["gone"]
    assert await read_to_eof(p.db) == b""  # the server is told with EOF
    p.db.close()
    await asyncio.wait_for(p.relay.server_closed, 10)


async def test_the_servers_eof_waits_for_what_the_server_is_owed(pair: Any) -> None:
    p = pair(server_buffer=4096)
    owed = os.urandom(2 * 2**20)  # more than the server's socket takes at once
    p.relay.to_server(owed)
    p.relay.close_client()
    await asyncio.wait_for(p.relay.client_closed, 10)
    assert p.relay.server.buffered > 0  # the EOF waits behind these
    assert await read_to_eof(p.db) == owed
    p.db.close()
    await asyncio.wait_for(p.relay.server_closed, 10)


async def test_close_drops_both_sides_at_once(pair: Any) -> None:
    p = pair()
    loop = asyncio.get_running_loop()
    sending = asyncio.create_task(loop.sock_sendall(p.db, bytes(8 * 2**20)))
    await wait_until(lambda: p.relay.client.buffered > 0, "bytes held for the app")
    p.relay.close()
    assert p.relay.client_closed.done() and p.relay.server_closed.done()
    assert all(map(closed, p.fds, p.inodes))
    sending.cancel()
    await asyncio.gather(sending, return_exceptions=True)


async def test_an_observer_that_fails_ends_the_session_and_is_reported(pair: Any) -> None:
    reported: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    try:
        def broken(data: bytes) -> None:
            raise ValueError("observer bug")

        p = pair(server_observer=broken)
        await loop.sock_sendall(p.db, b"Z\x00\x00\x00\x05I")
        await asyncio.wait_for(p.relay.server_closed, 10)
        assert await read_to_eof(p.app) == b""  # the chunk that failed was not sent on
        [context] = reported
        assert isinstance(context["exception"], ValueError)
        assert "session closed" in context["message"]
    finally:
        loop.set_exception_handler(None)


class _FailsOnEnd(relay.SocketRelay):
    """A relay whose reaction to an end of stream raises (as a bug in it would)."""

    def _lost(self, end: Any, error: int) -> None:
        raise RuntimeError("relay bug")


class _FailsTwice(_FailsOnEnd):
    """... and whose reaction to that fails too."""

    def _fault(self, end: Any, error: BaseException) -> None:
        raise RuntimeError("fault bug")


def relay_between(kind: type, loop: asyncio.AbstractEventLoop, **kwargs: Any
                  ) -> tuple[Any, socket.socket, socket.socket]:
    """A started relay of `kind`, with the app's and the server's sockets."""
    app, proxy_client = socket.socketpair()
    proxy_server, db = socket.socketpair()
    for sock in (app, db):
        sock.setblocking(False)
    r = kind(loop, proxy_client.detach(), proxy_server.detach(), **kwargs)
    r.start()
    return r, app, db


async def test_a_relay_that_fails_is_ended_and_reported_and_the_others_in_that_wakeup_go_on() -> None:
    loop = asyncio.get_running_loop()
    poller = relay.poller_for(loop)
    reported: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _, context: reported.append(context))
    wakeups: list[int] = []  # the loop's calls of the poller, counted
    served_in: list[int] = []

    def counting() -> None:
        wakeups.append(len(wakeups))
        poller.dispatch()

    def failed_in(self: Any, end: Any, error: BaseException) -> None:
        served_in.append(len(wakeups))
        relay.SocketRelay._fault(self, end, error)

    before = poller.watching
    failing = [relay_between(_FailsOnEnd, loop) for _ in range(2)]
    for r, _, _ in failing:
        r._fault = failed_in.__get__(r)  # type: ignore[method-assign]
    good, app, db = relay_between(relay.SocketRelay, loop,
                                  client_observer=lambda d: served_in.append(len(wakeups)))
    loop.remove_reader(poller.fd)
    loop.add_reader(poller.fd, counting)
    try:
        for _, failing_app, _ in failing:  # both failing apps leave, and the third app sends,
            failing_app.close()            # before the loop's next wakeup: one serves all three
        app.send(b"Q\x00\x00\x00\x05;")
        assert await read_exactly(db, 6) == b"Q\x00\x00\x00\x05;"
        await wait_until(lambda: len(reported) == 2, "both failures reported")
        assert len(served_in) == 3 and len(set(served_in)) == 1, f"served in wakeups {served_in}"
        for r, _, _ in failing:
            assert r.client_closed.done() and r.server_closed.done()
        assert poller.watching == before + 2  # the good relay's two ends only
        # Ended: no event is left pending (level-triggered) to report them again.
        assert not select.select([poller.fd], [], [], 0)[0]
        assert len(reported) == 2
        assert all(isinstance(c["exception"], RuntimeError) for c in reported)
        assert {c["message"] for c in reported} == {"relay failed; session closed"}
    finally:
        loop.remove_reader(poller.fd)
        loop.add_reader(poller.fd, poller.dispatch)
        loop.set_exception_handler(None)
        for r, a, d in [*failing, (good, app, db)]:
            r.close()
            a.close()
            d.close()


async def test_a_relay_whose_fault_handling_fails_too_loses_both_sockets(monkeypatch: Any) -> None:
    loop = asyncio.get_running_loop()
    unraisable: list[Any] = []
    monkeypatch.setattr("sys.unraisablehook", unraisable.append)
    r, app, db = relay_between(_FailsTwice, loop)
    try:
        app.close()
        await wait_until(lambda: unraisable, "the failure reported")
        assert r.client.fd == -1 and r.server.fd == -1
        assert await read_to_eof(db) == b""  # the server sees its client go: its slot frees
        assert str(unraisable[0].exc_value) == "fault bug"
    finally:
        r.close()
        db.close()


class _Interrupted(relay.SocketRelay):
    def _lost(self, end: Any, error: int) -> None:
        raise KeyboardInterrupt


async def test_an_interrupt_in_a_relay_is_raised_not_taken_for_its_fault() -> None:
    loop = asyncio.get_running_loop()
    r, app, db = relay_between(_Interrupted, loop)
    poller = relay.poller_for(loop)
    try:
        app.close()
        assert select.select([poller.fd], [], [], 10)[0]  # ready; the loop has not run since
        with pytest.raises(KeyboardInterrupt):
            poller.dispatch()  # as the loop would call it: the loop then stops, as for any handle
        assert not r.client_closed.done()  # not ended as a fault would end it
    finally:
        r.close()  # before the loop runs again: nothing left for it to raise
        db.close()


def test_a_loop_closed_with_sessions_relayed_frees_them_and_their_sockets() -> None:
    import gc

    import uvloop
    loop = uvloop.new_event_loop()
    made: list[Any] = []

    async def open_one() -> None:
        made.append(relay_between(relay.SocketRelay, asyncio.get_running_loop()))

    loop.run_until_complete(open_one())
    r, app, db = made.pop()
    poller = relay.poller_for(loop)
    assert poller.watching == 2
    fds, inodes = (r.client.fd, r.server.fd), tuple(os.fstat(fd).st_ino for fd in (r.client.fd, r.server.fd))
    loop.close()
    del r, poller, loop
    gc.collect()
    try:
        assert all(map(closed, fds, inodes))
        app.setblocking(True)
        db.setblocking(True)
        assert app.recv(1) == b"" and db.recv(1) == b""
    finally:
        app.close()
        db.close()


async def test_closed_relays_leave_the_loops_poller_watching_nothing(pair: Any) -> None:
    poller = relay.poller_for(asyncio.get_running_loop())
    before = poller.watching
    p = pair()
    assert poller.watching == before + 2
    p.app.close()
    p.db.close()
    await asyncio.wait_for(asyncio.gather(p.relay.client_closed, p.relay.server_closed), 10)
    assert poller.watching == before
    q = pair()
    q.relay.close()
    assert poller.watching == before


async def test_a_detached_relay_holds_nothing(pair: Any) -> None:
    p = pair(client_observer=lambda d: None)
    p.app.close()
    p.db.close()
    await asyncio.wait_for(asyncio.gather(p.relay.client_closed, p.relay.server_closed), 10)
    p.relay.detach()
    import gc
    assert gc.get_referents(p.relay.client) == [type(p.relay.client)]


def tcp_pair() -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        near = socket.create_connection(listener.getsockname())
        far, _ = listener.accept()
    return near, far


@pytest.mark.parametrize("side", ["server", "client"])
async def test_bytes_then_a_reset_in_one_wakeup_are_relayed_and_the_end_is_seen(side: str) -> None:
    # A backend that exits with input unread resets its connection; its last message
    # (a FATAL) and the reset then reach the proxy together, as one readable-with-error
    # event. (On uvloop's own polls, libuv dropped the socket after one such call.)
    loop = asyncio.get_running_loop()
    app, proxy_client = tcp_pair()
    proxy_server, db = tcp_pair()
    r = relay.SocketRelay(loop, proxy_client.detach(), proxy_server.detach())
    r.start()
    sender, receiver = (db, app) if side == "server" else (app, db)
    receiver.setblocking(False)
    last = b"E" + bytes(4000)
    sender.sendall(last)  # both in this one callback: the loop sees them at once
    sender.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sender.close()
    try:
        assert await read_to_eof(receiver) == last
        if side == "client":
            await asyncio.wait_for(r.client_closed, 10)
            assert not r.server_closed.done()  # until the server closes (on our EOF)
            receiver.close()
        await asyncio.wait_for(asyncio.gather(r.server_closed, r.client_closed), 10)
    finally:
        r.close()
        receiver.close()


async def test_a_reset_behind_more_than_a_wakeup_reads_is_still_seen() -> None:
    # More than one wakeup reads (4 chunks) waits in the socket when the peer resets:
    # all of it reaches the app, then the end is seen.
    loop = asyncio.get_running_loop()
    app, proxy_client = socket.socketpair()
    proxy_server, db = socket.socketpair()
    for sock in (proxy_client, db):  # room for all of it on the way
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
    r = relay.SocketRelay(loop, proxy_client.detach(), proxy_server.detach())
    r.to_server(b"unread")  # the server closes with input unread: a reset
    db.setblocking(False)
    sent = bytearray()
    block = os.urandom(64 * 1024)
    try:
        while len(sent) < 6 * 2**20:
            sent += block[:db.send(block)]
    except BlockingIOError:
        pass
    db.close()
    assert len(sent) > 4 * 256 * 1024, "the test needs more queued than one wakeup reads"
    r.start()
    app.setblocking(False)
    try:
        assert await read_exactly(app, len(sent)) == sent
        await asyncio.wait_for(r.server_closed, 10)
    finally:
        r.close()
        app.close()

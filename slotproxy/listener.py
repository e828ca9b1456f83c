"""Accepting client connections, and living through running out of file descriptors.

The proxy accepts on its own non-blocking listening sockets rather than through
loop.create_server, whose accept (libuv's) hides EMFILE: it takes the waiting
connections and drops them. Here, when the process or the system runs out of
descriptors, accepting pauses with a backoff while the clients wait in the
kernel's backlog; the first pause of a streak is logged, and the proxy serves on.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable
from typing import Any

from .config import Address

logger = logging.getLogger("slotproxy.listener")

OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
BACKOFF_FIRST = 0.05
BACKOFF_CAP = 2.0
BATCH = 64  # connections accepted per wakeup, so that one busy socket does not starve the loop


class Listener:
    def __init__(self, loop: asyncio.AbstractEventLoop, sockets: list[socket.socket],
                 factory: Callable[[], asyncio.Protocol]) -> None:
        self.loop = loop
        self.sockets = sockets
        self.factory = factory
        self.pauses = 0  # times accepting paused for lack of descriptors
        self._backoff = 0.0
        self._timers: dict[int, asyncio.TimerHandle] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._closed = False

    @classmethod
    def bind(cls, loop: asyncio.AbstractEventLoop, address: Address, factory: Callable[[], asyncio.Protocol],
             *, backlog: int, reuse_port: bool = False) -> Listener:
        infos = socket.getaddrinfo(address.host or None, address.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
        sockets = []
        try:
            for family, kind, proto, _, sockaddr in dict.fromkeys(infos):
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if reuse_port:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sock.bind(sockaddr)
                sock.listen(backlog)
                sock.setblocking(False)
        except OSError:
            for sock in sockets:
                sock.close()
            raise
        return cls(loop, sockets, factory)

    def start(self) -> None:
        for sock in self.sockets:
            self.loop.add_reader(sock.fileno(), self._accept, sock, sock.family)

    def close(self) -> None:
        self._closed = True
        for timer in self._timers.values():
            timer.cancel()
        for sock in self.sockets:
            if sock.fileno() >= 0:
                self.loop.remove_reader(sock.fileno())
                sock.close()

    def _accept(self, sock: socket.socket, family: socket.AddressFamily) -> None:
        # `family` comes from start(): sock.family runs an enum lookup in Python on each call.
        for _ in range(BATCH):
            try:
                # socket.accept() without what it does per call to learn the family and
                # kind anew and the default timeout; libuv makes the socket non-blocking.
                fd, _ = sock._accept()  # type: ignore[attr-defined]
                conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno in OUT_OF_DESCRIPTORS:
                    self._pause(sock, e)
                    return
                if e.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EPERM):
                    continue  # that client is gone already
                logger.error("accept failed: %s", e)
                return
            self._backoff = 0.0
            task = self.loop.create_task(self._open(conn))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _open(self, conn: socket.socket) -> None:
        try:
            await self.loop.connect_accepted_socket(self.factory, conn)
        except OSError as e:
            logger.warning("could not set up an accepted connection: %s", e)
            conn.close()

    def _pause(self, sock: socket.socket, error: OSError) -> None:
        """Out of descriptors: stop accepting on `sock` for a while; the backlog holds the rest."""
        first = self._backoff == 0.0
        self._backoff = BACKOFF_FIRST if first else min(BACKOFF_CAP, self._backoff * 2)
        self.pauses += 1
        if first:
            logger.error("out of file descriptors (%s): not accepting for now; waiting clients stay "
                         "in the listen backlog; raise the limit (ulimit -n) or lower proxy.max_clients",
                         error.strerror)
        self.loop.remove_reader(sock.fileno())
        self._timers[sock.fileno()] = self.loop.call_later(self._backoff, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        self._timers.pop(sock.fileno(), None)
        if not self._closed:
            self.loop.add_reader(sock.fileno(), self._accept, sock, sock.family)
            self._accept(sock, sock.family)

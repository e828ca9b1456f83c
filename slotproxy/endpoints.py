"""The admin HTTP endpoints: /metrics, /status, /health, /ready.

A deliberately small HTTP/1.1 server on asyncio streams (this is not the hot
path): GET or HEAD, one request per connection, bounded headers.
/health never touches PostgreSQL; /ready says whether the proxy accepts and
each server is reachable.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from .config import Address
from .status import snapshot

if TYPE_CHECKING:
    from .server import Proxy

logger = logging.getLogger("slotproxy.admin")

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
           503: "Service Unavailable"}


class AdminEndpoints:
    def __init__(self, proxy: Proxy) -> None:
        self.proxy = proxy
        self._server: asyncio.base_events.Server | None = None

    async def start(self, address: Address) -> None:
        self._server = await asyncio.start_server(self._handle, address.host, address.port,
                                                  reuse_address=True)
        if address.host not in ("127.0.0.1", "::1", "localhost"):
            logger.warning("admin endpoints listen on %s, beyond loopback: /status shows "
                           "client addresses and users", self.address)

    @property
    def address(self) -> Address | None:
        if self._server is None or not self._server.sockets:
            return None
        host, port = self._server.sockets[0].getsockname()[:2]
        return Address(host, port)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, OSError):
            writer.close()
            return
        try:
            method, path, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
        except ValueError:
            await self._respond(writer, 400, b"bad request\n", "text/plain")
            return
        path = path.split("?", 1)[0]
        if method not in ("GET", "HEAD"):
            await self._respond(writer, 405, b"GET only\n", "text/plain")
            return
        status, body, ctype = await self._route(path)
        await self._respond(writer, status, b"" if method == "HEAD" else body, ctype,
                            length=len(body))

    async def _route(self, path: str) -> tuple[int, bytes, str]:
        if path == "/metrics":
            return 200, generate_latest(self.proxy.stats.registry), CONTENT_TYPE_LATEST
        if path == "/status":
            return 200, _json(snapshot(self.proxy)), "application/json"
        if path == "/health":
            return 200, b"ok\n", "text/plain"
        if path == "/ready":
            ready, reasons = await self.readiness()
            return (200 if ready else 503), _json({"ready": ready, "reasons": reasons}), \
                "application/json"
        return 404, b"not found: try /metrics, /status, /health or /ready\n", "text/plain"

    async def readiness(self) -> tuple[bool, list[str]]:
        """Accepting, and every server reachable (by its monitor, else a TCP connect)."""
        reasons = []
        if self.proxy.stopping:
            reasons.append("shutting down")
        for upstream in list(self.proxy.upstreams.values()):
            if upstream.retired:
                continue
            if upstream.monitor is not None:
                if upstream.capacity.blind:
                    reasons.append(f"server {upstream.address}: monitor blind ({upstream.capacity.why})")
            elif not await _reachable(upstream.address):
                reasons.append(f"server {upstream.address}: not reachable")
        return not reasons, reasons

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, ctype: str,
                       length: int | None = None) -> None:
        head = (f"HTTP/1.1 {status} {REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body) if length is None else length}\r\n"
                "Connection: close\r\n\r\n").encode("latin-1")
        try:
            writer.write(head + body)
            await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()


async def _reachable(address: Address, timeout: float = 1.0) -> bool:
    try:
        async with asyncio.timeout(timeout):
            if address.socket_path is not None:
                _, writer = await asyncio.open_unix_connection(address.socket_path)
            else:
                _, writer = await asyncio.open_connection(address.host, address.port)
    except (OSError, TimeoutError):
        return False
    writer.close()
    return True


def _json(data: object) -> bytes:
    return (json.dumps(data, indent=1) + "\n").encode()

"""A bare forwarder: uvloop Protocols that copy bytes both ways, nothing else.

The floor of a relay on asyncio transports (uvloop), for the measurements:
no startup parsing, no queue, no tracking. Not a proxy to use.

    python -m loadtest.forwarder --backend HOST:PORT (or /socket/dir:PORT) [--listen-port N]
"""

from __future__ import annotations

import argparse
import asyncio

import uvloop


class _Half(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.peer: _Half | None = None
        self.early: list[bytes] = []  # from the client before the server connection is up

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is None:
            self.early.append(data)
        else:
            self.peer.transport.write(data)  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.transport.close()  # type: ignore[union-attr]


async def main(host: str, port: int, listen_port: int) -> None:
    loop = asyncio.get_running_loop()
    linking: set[asyncio.Task[None]] = set()

    def client() -> _Half:
        half = _Half()
        task = loop.create_task(link(half))
        linking.add(task)
        task.add_done_callback(linking.discard)
        return half

    async def link(half: _Half) -> None:
        factory = _Half
        if host.startswith("/"):
            _, server = await loop.create_unix_connection(factory, f"{host}/.s.PGSQL.{port}")
        else:
            _, server = await loop.create_connection(factory, host, port)
        server.peer, half.peer = half, server
        for data in half.early:
            server.transport.write(data)  # type: ignore[union-attr]
        if half.transport is None or half.transport.is_closing():
            server.transport.close()  # type: ignore[union-attr]

    listener = await loop.create_server(client, "127.0.0.1", listen_port)
    print(f"listening on 127.0.0.1:{listener.sockets[0].getsockname()[1]}", flush=True)
    await listener.serve_forever()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", required=True, metavar="HOST:PORT")
    p.add_argument("--listen-port", type=int, default=0)
    args = p.parse_args()
    server_host, _, server_port = args.backend.rpartition(":")
    try:
        uvloop.run(main(server_host, int(server_port), args.listen_port))
    except KeyboardInterrupt:
        pass

"""A bare PostgreSQL wire client for tests that must control each byte."""

from __future__ import annotations

import asyncio
import struct

from slotproxy import wire


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def connect(cls, host: str, port: int) -> RawClient:
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def send_startup(self, user: str = "app", database: str = "postgres", **params: str) -> None:
        self.send(wire.encode_startup({"user": user, "database": database, **params}))

    async def read_message(self, timeout: float = 10.0) -> tuple[str, bytes] | None:
        """The next server message, or None at EOF."""
        async with asyncio.timeout(timeout):
            try:
                head = await self.reader.readexactly(5)
            except asyncio.IncompleteReadError as e:
                if e.partial:
                    raise
                return None
            (length,) = struct.unpack("!i", head[1:])
            body = await self.reader.readexactly(length - 4)
        return chr(head[0]), body

    async def read_until(self, mtype: str, timeout: float = 10.0) -> list[tuple[str, bytes]]:
        """Messages up to and including the first of type `mtype`."""
        seen = []
        while True:
            msg = await self.read_message(timeout)
            if msg is None:
                raise AssertionError(f"EOF before {mtype!r}; got {seen}")
            seen.append(msg)
            if msg[0] == mtype:
                return seen

    async def read_error_then_eof(self, timeout: float = 10.0) -> dict[str, str]:
        """Expect exactly one ErrorResponse, then the connection closed."""
        msg = await self.read_message(timeout)
        assert msg is not None and msg[0] == "E", f"expected an ErrorResponse, got {msg!r}"
        assert await self.read_message(timeout) is None, "expected EOF after the ErrorResponse"
        return wire.parse_fields(msg[1])

    async def read_eof(self, timeout: float = 10.0) -> bytes:
        """Everything until EOF."""
        async with asyncio.timeout(timeout):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


def query(sql: str) -> bytes:
    body = sql.encode() + b"\0"
    return b"Q" + struct.pack("!i", 4 + len(body)) + body


TERMINATE = b"X\x00\x00\x00\x04"

"""Random and mutated first packets at a live proxy; then a real client must still get in.

    python -m loadtest.fuzz --spawn --inputs 20000
    python -m loadtest.fuzz --target 127.0.0.1:6432 --dsn postgresql://app@127.0.0.1:6432/postgres

Each input is one connection: the bytes are sent (sometimes followed by a
half-close), and whatever comes back within a moment is sorted: an
ErrorResponse, a one-byte SSL/GSS answer, a server's answer (the bytes made a
valid startup packet), a silent close, or silence. Then a real client connects
and runs a query. Exit 1 if it cannot, if the proxy died, or (with --spawn)
if its log shows an internal error.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import struct
import sys
import time
from collections import Counter
from collections.abc import Iterator

import asyncpg

from slotproxy import wire

READ_TIMEOUT = 0.3
PROTOCOL_3 = 196608


def _valid_packets(rng: random.Random) -> list[bytes]:
    params = {"user": rng.choice(["app", "postgres", "nobody", "x" * rng.randint(1, 60)]),
              "database": rng.choice(["postgres", "slotproxy", "nope"])}
    if rng.random() < 0.5:
        params["application_name"] = "fuzz"
    return [
        wire.encode_startup(params),
        wire.encode_startup(params, minor=2),
        struct.pack("!ii", 8, wire.SSL_REQUEST_CODE),
        struct.pack("!ii", 8, wire.GSSENC_REQUEST_CODE),
        wire.encode_cancel(rng.randint(-2**31, 2**31 - 1), rng.randbytes(rng.choice([4, 32]))),
        bytes.fromhex("160301") + rng.randbytes(rng.randint(0, 80)),  # a TLS hello, of sorts
    ]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    out = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        choice = rng.randrange(7)
        if choice == 0 and out:  # flip bits
            i = rng.randrange(len(out))
            out[i] ^= 1 << rng.randrange(8)
        elif choice == 1 and out:  # truncate
            del out[rng.randrange(len(out)):]
        elif choice == 2:  # a length field that lies
            length = rng.choice([0, 4, 7, 8, 9, 10000, 10001, 2**31 - 1, -1, rng.randint(0, 300)])
            out[0:4] = struct.pack("!i", length)
        elif choice == 3:  # an unknown code
            out[4:8] = struct.pack("!i", rng.randint(-2**31, 2**31 - 1))
        elif choice == 4 and out:  # insert garbage
            i = rng.randrange(len(out) + 1)
            out[i:i] = rng.randbytes(rng.randint(1, 16))
        elif choice == 5:  # packets back to back
            out += _valid_packets(rng)[rng.randrange(6)]
        elif out:  # remove a stretch
            i = rng.randrange(len(out))
            del out[i:i + rng.randint(1, 8)]
    return bytes(out)


def inputs(seed: int, count: int) -> Iterator[tuple[bytes, bool]]:
    """(bytes, half-close after them) for `count` inputs."""
    rng = random.Random(seed)
    for _ in range(count):
        kind = rng.random()
        if kind < 0.2:
            data = rng.randbytes(rng.randint(0, 200))
        elif kind < 0.3:
            data = rng.choice(_valid_packets(rng))
        else:
            data = _mutate(rng, rng.choice(_valid_packets(rng)))
        yield data, rng.random() < 0.3


async def _probe(host: str, port: int, data: bytes, half_close: bool) -> str:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:
        return f"connect failed: {e.strerror}"
    try:
        writer.write(data)
        if half_close:
            writer.write_eof()
        got = b""
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                got = await reader.read(65536)
        except TimeoutError:
            return "silence (waiting for more)"
        except OSError:
            return "reset"
        if not got:
            return "closed without a word"
        if got[:1] == b"E":
            return "ErrorResponse"
        if got in (b"N", b"S"):
            return "SSL/GSS answer"
        return "server answered (a valid startup)"
    finally:
        writer.close()


async def fuzz(host: str, port: int, dsn: str, count: int, concurrency: int, seed: int,
               quiet: bool = False) -> tuple[Counter[str], bool, float]:
    outcomes: Counter[str] = Counter()
    queue = iter(inputs(seed, count))
    started = time.monotonic()

    async def worker() -> None:
        for data, half_close in queue:
            outcomes[await _probe(host, port, data, half_close)] += 1
            done = sum(outcomes.values())
            if not quiet and done % 500 == 0:
                print(f"\r{done}/{count} inputs", end="", file=sys.stderr, flush=True)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - started
    if not quiet:
        print(file=sys.stderr)
    try:
        conn = await asyncpg.connect(dsn, timeout=30)
        ok = await conn.fetchval("select 42") == 42
        await conn.close()
    except (OSError, asyncpg.PostgresError, TimeoutError) as e:
        print(f"the real client failed: {e}", file=sys.stderr)
        ok = False
    return outcomes, ok, elapsed


def report(outcomes: Counter[str], ok: bool, elapsed: float) -> str:
    total = sum(outcomes.values())
    lines = [f"{total} inputs tried in {elapsed:.1f} s ({total / max(elapsed, 1e-9):.0f}/s):"]
    lines += [f"  {n:7d}  {what}" for what, n in outcomes.most_common()]
    lines.append("a real client got through afterwards" if ok else "A REAL CLIENT DID NOT GET THROUGH")
    return "\n".join(lines)


async def _main(args: argparse.Namespace) -> int:
    if args.spawn:
        from .spawn import Environment, SpawnOptions

        async with Environment(SpawnOptions(kinds=("slotproxy",), max_connections=20)) as env:
            proxy = env.children[0]
            outcomes, ok, elapsed = await fuzz("127.0.0.1", proxy.port, env.targets[0].dsn, args.inputs,
                                               args.concurrency, args.seed, args.quiet)
            alive = proxy.proc.returncode is None
            # A bug the client saw only as XX000 shows in the log as a traceback.
            internal = proxy.log.read_text(errors="replace").count("internal error")
    else:
        host, _, port = args.target.rpartition(":")
        outcomes, ok, elapsed = await fuzz(host.strip("[]"), int(port), args.dsn, args.inputs,
                                           args.concurrency, args.seed, args.quiet)
        alive, internal = True, 0
    print(report(outcomes, ok, elapsed))
    if not alive:
        print("THE PROXY DIED")
    if internal:
        print(f"{internal} INTERNAL ERRORS in the proxy's log")
    elif args.spawn:
        print("no internal error in the proxy's log")
    return 0 if ok and alive and not internal else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fuzz", description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--spawn", action="store_true", help="a throwaway server and slotproxy")
    where.add_argument("--target", metavar="HOST:PORT", help="a running proxy")
    parser.add_argument("--dsn", help="for --target: the real client's DSN, through the proxy")
    parser.add_argument("--inputs", type=int, default=5000, help="connections to try (5000)")
    parser.add_argument("--concurrency", type=int, default=16, help="at once (16)")
    parser.add_argument("--seed", type=int, default=1, help="the same seed, the same inputs")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.target and not args.dsn:
        parser.error("--target needs --dsn for the real client")
    return asyncio.run(_main(args))


if __name__ == "__main__":
    sys.exit(main())

"""The session tracker, pure: what a relayed session is doing, from its messages."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slotproxy import wire
from slotproxy.wire import ACTIVE, IDLE, IDLE_IN_FAILED_TRANSACTION, IDLE_IN_TRANSACTION, STARTING

from .conftest import WALKERS


def msg(mtype: str, body: bytes = b"") -> bytes:
    return mtype.encode() + struct.pack("!i", 4 + len(body)) + body


def ready(status: str = "I") -> bytes:
    return msg("Z", status.encode())


STARTUP = (msg("R", b"\0\0\0\0") + msg("S", b"TimeZone\0UTC\0")
           + msg("K", struct.pack("!i", 4242) + b"SECRET") + ready())
RESULT = msg("T", b"\0\1" + b"x" * 20) + msg("D", b"\0\1\0\0\0\2" + b"42") + msg("C", b"SELECT 1\0")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture(params=WALKERS)
def walker(request: pytest.FixtureRequest) -> type:
    return request.param


def tracker(walker: type) -> wire.SessionTracker:
    return wire.SessionTracker(Clock(), walker)


def started(walker: type) -> wire.SessionTracker:
    t = tracker(walker)
    t.from_server(STARTUP)
    return t


def test_startup_gives_the_key_and_ends_idle(walker: type) -> None:
    t = tracker(walker)
    assert t.state == STARTING
    t.from_server(STARTUP)
    assert t.state == IDLE and t.backend_key == (4242, b"SECRET")


def test_a_refusal_during_startup_is_kept(walker: type) -> None:
    t = tracker(walker)
    t.from_server(msg("R", b"\0\0\0\0") + msg("E", b"SFATAL\0C53300\0Mno slots\0\0"))
    assert t.state == STARTING and t.errors == [{"S": "FATAL", "C": "53300", "M": "no slots"}]


def test_a_query_is_active_until_its_ready_for_query(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("Q", b"select 42\0"))
    assert t.state == ACTIVE
    t.from_server(RESULT)
    assert t.state == ACTIVE
    t.from_server(ready())
    assert t.state == IDLE


def test_transaction_states_come_from_ready_for_query(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("Q", b"begin\0"))
    t.from_server(msg("C", b"BEGIN\0") + ready("T"))
    assert t.state == IDLE_IN_TRANSACTION
    t.from_client(msg("Q", b"select 1/0\0"))
    t.from_server(msg("E", b"SERROR\0C22012\0\0") + ready("E"))
    assert t.state == IDLE_IN_FAILED_TRANSACTION


def test_extended_protocol_is_active_until_sync_is_answered(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("P", b"\0select 1\0\0\0") + msg("B", b"\0\0" + b"\0" * 6) + msg("E", b"\0\0\0\0\0"))
    assert t.state == ACTIVE  # no Sync yet: work may run after Execute
    t.from_server(msg("1") + msg("2") + msg("D", b"\0\1\0\0\0\1" + b"1") + msg("C", b"SELECT 1\0"))
    assert t.state == ACTIVE
    t.from_client(msg("S"))
    t.from_server(ready())
    assert t.state == IDLE


def test_pipelined_queries_stay_active_until_the_last_answer(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("Q", b"select 1\0") + msg("Q", b"select pg_sleep(4)\0"))
    t.from_server(RESULT + ready())
    assert t.state == ACTIVE, "the second query still runs"
    t.from_server(RESULT + ready())
    assert t.state == IDLE


def test_copy_in_is_one_request(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("Q", b"copy t from stdin\0"))
    t.from_server(msg("G", b"\0\0\0"))
    t.from_client(msg("d", b"1\n") * 3 + msg("c"))
    assert t.state == ACTIVE
    t.from_server(msg("C", b"COPY 3\0") + ready())
    assert t.state == IDLE


def test_a_client_midway_through_a_message_is_active(walker: type) -> None:
    t = started(walker)
    query = msg("Q", b"select 1\0")
    t.from_client(query[:3])
    assert t.state == ACTIVE
    t.from_client(query[3:])
    t.from_server(RESULT + ready())
    assert t.state == IDLE


def test_since_moves_only_when_the_session_starts_or_stops_working(walker: type) -> None:
    t = started(walker)
    idle_since = t.since
    t.from_server(msg("N", b"SNOTICE\0\0"))  # a notice while idle changes nothing
    assert t.since == idle_since
    t.from_client(msg("Q", b"select 1\0"))
    busy_since = t.since
    assert busy_since > idle_since
    t.from_client(msg("Q", b"select 2\0"))
    assert t.since == busy_since
    t.from_server(RESULT + ready() + RESULT + ready())
    assert t.since > busy_since


def test_terminate_is_seen(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("X"))
    assert t.walker.terminated and t.state == IDLE


def test_a_stream_that_makes_no_sense_counts_as_active(walker: type) -> None:
    t = started(walker)
    t.from_client(b"Q\x00\x00\x00\x01garbage")
    assert t.walker.lost and t.state == ACTIVE
    t.from_server(ready())
    assert t.state == ACTIVE


def test_a_ready_for_query_of_the_wrong_length_counts_as_active(walker: type) -> None:
    t = started(walker)
    t.from_client(msg("Q", b"select 1\0"))
    t.from_server(b"Z\x00\x00\x00\x04")  # no status byte: not a ReadyForQuery a server sends
    assert t.walker.lost and t.state == ACTIVE


def test_startup_messages_split_across_chunks_are_kept_whole(walker: type) -> None:
    t = tracker(walker)
    refusal = msg("E", b"SFATAL\0C53300\0M" + b"m" * 3000 + b"\0\0")
    stream = msg("R", b"\0\0\0\0") + refusal
    for i in range(0, len(stream), 700):
        t.from_server(stream[i:i + 700])
    assert t.errors == [{"S": "FATAL", "C": "53300", "M": "m" * 3000}] and t.state == STARTING


SERVER_MESSAGES = st.sampled_from([
    msg("D", b"\0\1\0\0\0\3abc"), msg("D", b"x" * 300), msg("C", b"SELECT 1\0"), msg("N", b"S\0\0"),
    msg("T", b"\0\0"), msg("1"), msg("2"), ready("I"), ready("T"), ready("E"),
])


@pytest.mark.parametrize("walker", WALKERS)
@settings(max_examples=300, deadline=None)
@given(st.lists(SERVER_MESSAGES, max_size=40), st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_chunking_never_changes_what_is_seen(walker: type, messages: list[bytes], cuts: list[int]) -> None:
    stream = STARTUP + b"".join(messages)
    whole = tracker(walker)
    whole.from_client(msg("Q", b"x\0") * 10)
    whole.from_server(stream)
    pieces = tracker(walker)
    pieces.from_client(msg("Q", b"x\0") * 10)
    for chunk in chunked(stream, cuts):
        pieces.from_server(chunk)
    assert (pieces.state, pieces.walker.pending, pieces.walker.status, pieces.backend_key) == \
           (whole.state, whole.walker.pending, whole.walker.status, whole.backend_key)
    assert not pieces.walker.midway and not whole.walker.midway


def chunked(stream: bytes, cuts: list[int]) -> list[bytes]:
    chunks, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        chunks.append(stream[pos:pos + step])
        pos += step
        i += 1
    return chunks


CLIENT_MESSAGES = st.sampled_from([
    msg("Q", b"select 1\0"), msg("P", b"\0select 1\0\0\0"), msg("B", b"\0" * 8), msg("E", b"\0" * 5),
    msg("D", b"P\0"), msg("H"), msg("S"), msg("d", b"x" * 90), msg("c"), msg("F", b"\0" * 6), msg("X"),
])
GARBAGE = st.binary(max_size=12)  # lengths below 4, huge lengths, torn headers


@pytest.mark.skipif(wire.CompiledWalker is None, reason="slotproxy._walker was not built")
@settings(max_examples=400, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.one_of(SERVER_MESSAGES, CLIENT_MESSAGES, GARBAGE)),
                max_size=60),
       st.lists(st.integers(1, 300), min_size=1, max_size=10), st.booleans())
def test_the_compiled_walker_sees_what_the_reference_sees(
        parts: list[tuple[bool, bytes]], cuts: list[int], with_startup: bool) -> None:
    """Any traffic, well formed or not, in any chunking: the same state after every chunk."""
    walkers = [wire.Walker(Clock()), wire.CompiledWalker(Clock())]
    feed = [(False, c) for c in chunked(STARTUP, cuts)] if with_startup else []
    for from_server, data in parts:
        feed += [(from_server, c) for c in chunked(data, cuts)]
    for from_server, chunk in feed:
        seen = []
        for w in walkers:
            (w.from_server if from_server else w.from_client)(chunk)
            seen.append((w.pending, w.batch, w.status, w.ready, w.terminated, w.lost, w.midway,
                         w.since, list(w.held)))
        assert seen[0] == seen[1]


def test_work_sent_after_a_sync_stays_active_past_that_syncs_answer(walker: type) -> None:
    # libpq pipeline mode: a batch is answered while the next one already runs.
    t = started(walker)
    bind = msg("B", b"\0\0" + b"\0" * 6)
    t.from_client(msg("P", b"\0select 1\0\0\0") + bind + msg("E", b"\0\0\0\0\0") + msg("S")
                  + msg("P", b"\0select pg_sleep(4)\0\0\0") + bind + msg("E", b"\0\0\0\0\0") + msg("H"))
    t.from_server(msg("1") + msg("2") + msg("C", b"SELECT 1\0") + ready())
    assert t.state == ACTIVE, "the second batch has no Sync yet: its query may be running"
    t.from_client(msg("S"))
    t.from_server(msg("1") + msg("2") + msg("C", b"SELECT 1\0") + ready())
    assert t.state == IDLE


def test_a_server_message_half_received_is_not_idle(walker: type) -> None:
    t = started(walker)
    notification = msg("A", b"\0\0\0\1chan\0" + b"p" * 4000 + b"\0")
    t.from_server(notification[:1500])
    assert t.state == ACTIVE, "an ErrorResponse now would land inside the notification"
    t.from_server(notification[1500:])
    assert t.state == IDLE


@pytest.mark.skipif(wire.CompiledWalker is None, reason="slotproxy._walker was not built")
def test_a_compiled_walker_made_without_init_raises_instead_of_crashing() -> None:
    bare = wire.CompiledWalker.__new__(wire.CompiledWalker)
    with pytest.raises(RuntimeError, match="before __init__"):
        bare.from_server(msg("K", b"12345678"))
    with pytest.raises(RuntimeError, match="before __init__"):
        bare.from_client(msg("Q", b"select 1\0"))

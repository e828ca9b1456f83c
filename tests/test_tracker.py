"""The session tracker, pure: what a relayed session is doing, from its messages."""

from __future__ import annotations

import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from slotproxy import wire
from slotproxy.wire import ACTIVE, IDLE, IDLE_IN_FAILED_TRANSACTION, IDLE_IN_TRANSACTION, STARTING


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


def tracker() -> wire.SessionTracker:
    return wire.SessionTracker(Clock())


def started() -> wire.SessionTracker:
    t = tracker()
    t.from_server(STARTUP)
    return t


def test_startup_gives_the_key_and_ends_idle() -> None:
    t = tracker()
    assert t.state == STARTING
    t.from_server(STARTUP)
    assert t.state == IDLE and t.backend_key == (4242, b"SECRET")


def test_a_refusal_during_startup_is_kept() -> None:
    t = tracker()
    t.from_server(msg("R", b"\0\0\0\0") + msg("E", b"SFATAL\0C53300\0Mno slots\0\0"))
    assert t.state == STARTING and t.errors == [{"S": "FATAL", "C": "53300", "M": "no slots"}]


def test_a_query_is_active_until_its_ready_for_query() -> None:
    t = started()
    t.from_client(msg("Q", b"select 42\0"))
    assert t.state == ACTIVE
    t.from_server(RESULT)
    assert t.state == ACTIVE
    t.from_server(ready())
    assert t.state == IDLE


def test_transaction_states_come_from_ready_for_query() -> None:
    t = started()
    t.from_client(msg("Q", b"begin\0"))
    t.from_server(msg("C", b"BEGIN\0") + ready("T"))
    assert t.state == IDLE_IN_TRANSACTION
    t.from_client(msg("Q", b"select 1/0\0"))
    t.from_server(msg("E", b"SERROR\0C22012\0\0") + ready("E"))
    assert t.state == IDLE_IN_FAILED_TRANSACTION


def test_extended_protocol_is_active_until_sync_is_answered() -> None:
    t = started()
    t.from_client(msg("P", b"\0select 1\0\0\0") + msg("B", b"\0\0" + b"\0" * 6) + msg("E", b"\0\0\0\0\0"))
    assert t.state == ACTIVE  # no Sync yet: work may run after Execute
    t.from_server(msg("1") + msg("2") + msg("D", b"\0\1\0\0\0\1" + b"1") + msg("C", b"SELECT 1\0"))
    assert t.state == ACTIVE
    t.from_client(msg("S"))
    t.from_server(ready())
    assert t.state == IDLE


def test_pipelined_queries_stay_active_until_the_last_answer() -> None:
    t = started()
    t.from_client(msg("Q", b"select 1\0") + msg("Q", b"select pg_sleep(4)\0"))
    t.from_server(RESULT + ready())
    assert t.state == ACTIVE, "the second query still runs"
    t.from_server(RESULT + ready())
    assert t.state == IDLE


def test_copy_in_is_one_request() -> None:
    t = started()
    t.from_client(msg("Q", b"copy t from stdin\0"))
    t.from_server(msg("G", b"\0\0\0"))
    t.from_client(msg("d", b"1\n") * 3 + msg("c"))
    assert t.state == ACTIVE
    t.from_server(msg("C", b"COPY 3\0") + ready())
    assert t.state == IDLE


def test_a_client_midway_through_a_message_is_active() -> None:
    t = started()
    query = msg("Q", b"select 1\0")
    t.from_client(query[:3])
    assert t.state == ACTIVE
    t.from_client(query[3:])
    t.from_server(RESULT + ready())
    assert t.state == IDLE


def test_since_moves_only_when_the_session_starts_or_stops_working() -> None:
    t = started()
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


def test_terminate_is_seen() -> None:
    t = started()
    t.from_client(msg("X"))
    assert t.terminated and t.state == IDLE


def test_a_stream_that_makes_no_sense_counts_as_active() -> None:
    t = started()
    t.from_client(b"Q\x00\x00\x00\x01garbage")
    assert t.lost and t.state == ACTIVE
    t.from_server(ready())
    assert t.state == ACTIVE


SERVER_MESSAGES = st.sampled_from([
    msg("D", b"\0\1\0\0\0\3abc"), msg("D", b"x" * 300), msg("C", b"SELECT 1\0"), msg("N", b"S\0\0"),
    msg("T", b"\0\0"), msg("1"), msg("2"), ready("I"), ready("T"), ready("E"),
])


@settings(max_examples=300, deadline=None)
@given(st.lists(SERVER_MESSAGES, max_size=40), st.lists(st.integers(1, 700), min_size=1, max_size=20))
def test_chunking_never_changes_what_is_seen(messages: list[bytes], cuts: list[int]) -> None:
    stream = STARTUP + b"".join(messages)
    whole = tracker()
    whole.from_client(msg("Q", b"x\0") * 10)
    whole.from_server(stream)
    pieces = tracker()
    pieces.from_client(msg("Q", b"x\0") * 10)
    pos = i = 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        pieces.from_server(stream[pos:pos + step])
        pos += step
        i += 1
    assert (pieces.state, pieces.pending, pieces.txn, pieces.backend_key) == \
           (whole.state, whole.pending, whole.txn, whole.backend_key)
    assert (pieces._s_skip, pieces._s_carry) == (whole._s_skip, whole._s_carry) == (0, b"")


def test_work_sent_after_a_sync_stays_active_past_that_syncs_answer() -> None:
    # libpq pipeline mode: a batch is answered while the next one already runs.
    t = started()
    bind = msg("B", b"\0\0" + b"\0" * 6)
    t.from_client(msg("P", b"\0select 1\0\0\0") + bind + msg("E", b"\0\0\0\0\0") + msg("S")
                  + msg("P", b"\0select pg_sleep(4)\0\0\0") + bind + msg("E", b"\0\0\0\0\0") + msg("H"))
    t.from_server(msg("1") + msg("2") + msg("C", b"SELECT 1\0") + ready())
    assert t.state == ACTIVE, "the second batch has no Sync yet: its query may be running"
    t.from_client(msg("S"))
    t.from_server(msg("1") + msg("2") + msg("C", b"SELECT 1\0") + ready())
    assert t.state == IDLE


def test_a_server_message_half_received_is_not_idle() -> None:
    t = started()
    notification = msg("A", b"\0\0\0\1chan\0" + b"p" * 4000 + b"\0")
    t.from_server(notification[:1500])
    assert t.state == ACTIVE, "an ErrorResponse now would land inside the notification"
    t.from_server(notification[1500:])
    assert t.state == IDLE

"""The sans-IO parsers: what a client sends first, and server message framing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slotproxy import wire
from slotproxy.errors import ProtocolError


def header(length: int, code: int) -> bytes:
    return struct.pack("!ii", length, code)


STARTUP = wire.encode_startup({"user": "app", "database": "shop", "application_name": "web"})
SSL = header(8, wire.SSL_REQUEST_CODE)
GSS = header(8, wire.GSSENC_REQUEST_CODE)
CANCEL = wire.encode_cancel(4242, b"\x01\x02\x03\x04")
TLS_HELLO = bytes.fromhex("16030100f4010000f00303") + b"\x00" * 40


def events_of(data: bytes, *, step: int | None = None, encrypted: bool = False) -> tuple[list, bytes]:
    """Feed `data` whole or `step` bytes at a time; return the events and the trailing bytes."""
    reader = wire.StartupReader(encrypted=encrypted)
    events = []
    chunks = [data] if step is None else [data[i:i + step] for i in range(0, len(data), step)]
    for chunk in chunks:
        reader.feed(chunk)
        while (event := reader.next_event()) is not wire.NEED_DATA:
            events.append(event)
    return events, reader.take_trailing() if reader.finished else b""


def parse_three_ways(data: bytes) -> list:
    """Whole, a byte at a time, and followed by trailing bytes: all must agree."""
    whole, _ = events_of(data)
    bytewise, _ = events_of(data, step=1)
    trailing = b"Q\x00\x00\x00\x0dselect 1\x00"
    with_tail, tail = events_of(data + trailing)
    assert whole == bytewise == with_tail
    if whole and isinstance(whole[-1], (wire.StartupMessage, wire.CancelRequest)):
        assert tail == trailing  # nothing after the packet is lost
    return whole


def test_startup_message_parameters() -> None:
    [event] = parse_three_ways(STARTUP)
    assert isinstance(event, wire.StartupMessage)
    assert (event.major, event.minor) == (3, 0)
    assert event.user == "app" and event.database == "shop" and event.application_name == "web"
    assert event.raw == STARTUP


def test_database_defaults_to_user() -> None:
    [event] = parse_three_ways(wire.encode_startup({"user": "app"}))
    assert event.database == "app"
    assert event.application_name == ""


def test_protocol_3_2_is_passed_through() -> None:
    packet = wire.encode_startup({"user": "app"}, minor=2)
    [event] = parse_three_ways(packet)
    assert (event.major, event.minor) == (3, 2)
    assert event.raw == packet


def test_ssl_then_gss_then_startup() -> None:
    events = parse_three_ways(GSS + SSL + STARTUP)
    assert [type(e) for e in events] == [wire.GSSENCRequest, wire.SSLRequest, wire.StartupMessage]


@pytest.mark.parametrize("key", [b"\x01\x02\x03\x04", bytes(range(32)), b"k" * 256])
def test_cancel_request(key: bytes) -> None:
    packet = wire.encode_cancel(77, key)
    [event] = parse_three_ways(packet)
    assert event == wire.CancelRequest(pid=77, key=key, raw=packet)


def test_cancel_after_ssl_negotiation() -> None:
    events = parse_three_ways(SSL + CANCEL)
    assert isinstance(events[-1], wire.CancelRequest)


def test_direct_tls_hello_is_recognised_by_its_first_byte() -> None:
    assert parse_three_ways(TLS_HELLO) == [wire.DirectTLS()]


def test_reader_is_finished_after_startup() -> None:
    reader = wire.StartupReader()
    reader.feed(STARTUP + SSL)
    assert isinstance(reader.next_event(), wire.StartupMessage)
    assert reader.next_event() is wire.NEED_DATA
    assert reader.take_trailing() == SSL


def startup_body(body: bytes) -> bytes:
    return header(8 + len(body), 196608) + body


MALFORMED = [
    # (case, bytes, SQLSTATE, words in the message)
    ("http request", b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "08P01", "invalid length"),
    ("length 4", header(4, 196608), "08P01", "invalid length of startup packet: 4"),
    ("length 100000", header(100000, 196608), "08P01", "invalid length of startup packet: 100000"),
    ("negative length", b"\xff\xff\xff\xf0" + b"\x00" * 4, "08P01", "invalid length"),
    ("unknown request code", header(8, (1234 << 16) | 9999), "08P01", "unknown request code 1234.9999"),
    ("protocol 2.0", header(40, 2 << 16) + b"\x00" * 32, "0A000", "unsupported frontend protocol 2.0"),
    ("SSLRequest too long", header(12, wire.SSL_REQUEST_CODE) + b"\x00" * 4, "08P01", "SSLRequest"),
    ("SSLRequest twice", SSL + SSL, "08P01", "SSLRequest sent twice"),
    ("cancel too short", header(12, wire.CANCEL_REQUEST_CODE) + b"\x00" * 4, "08P01", "cancel request"),
    ("startup without parameters", header(8, 196608), "08P01", "no parameters"),
    ("startup without user", wire.encode_startup({"database": "x"}), "28000", "no PostgreSQL user name"),
    ("startup without terminator", startup_body(b"user\x00app"), "08P01", "terminator"),
    ("startup value missing", startup_body(b"user\x00\x00"), "08P01", "without value"),
    ("startup empty name", startup_body(b"\x00x\x00user\x00a\x00\x00"), "08P01", "terminator"),
]


@pytest.mark.parametrize(("case", "data", "sqlstate", "words"), MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_first_packets(case: str, data: bytes, sqlstate: str, words: str) -> None:
    for step in (None, 1):
        with pytest.raises(ProtocolError) as raised:
            events_of(data, step=step)
        assert raised.value.sqlstate == sqlstate
        assert words in raised.value.message


def test_bad_length_is_rejected_before_the_body_arrives() -> None:
    reader = wire.StartupReader()
    reader.feed(header(100000, 196608)[:4])
    with pytest.raises(ProtocolError):
        reader.next_event()


def test_truncated_packet_is_pending() -> None:
    reader = wire.StartupReader()
    reader.feed(STARTUP[:-3])
    assert reader.next_event() is wire.NEED_DATA
    assert reader.pending == len(STARTUP) - 3


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.integers(min_value=1, max_value=17), st.booleans())
def test_any_bytes_parse_or_raise_the_one_protocol_error(data: bytes, step: int, encrypted: bool) -> None:
    """Before and inside TLS alike: events, or ProtocolError; chunking changes nothing."""
    try:
        whole = events_of(data, encrypted=encrypted)
    except ProtocolError:
        with pytest.raises(ProtocolError):
            events_of(data, step=step, encrypted=encrypted)
        return
    assert events_of(data, step=step, encrypted=encrypted) == whole
    if encrypted:
        events, _ = whole
        assert not any(isinstance(e, (wire.SSLRequest, wire.GSSENCRequest, wire.DirectTLS))
                       for e in events), "no negotiation starts again inside TLS"


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.text(min_size=1).filter(lambda s: "\x00" not in s),
                       st.text().filter(lambda s: "\x00" not in s), max_size=5),
       st.text(min_size=1).filter(lambda s: "\x00" not in s))
def test_startup_parameters_round_trip(params: dict[str, str], user: str) -> None:
    params = {**params, "user": user}
    packet = wire.encode_startup(params)
    if len(packet) > wire.MAX_PACKET_LENGTH:
        return
    [event] = events_of(packet)[0]
    assert dict(event.params) == params


# -- server messages -------------------------------------------------------------


def message(mtype: bytes, body: bytes) -> bytes:
    return mtype + struct.pack("!i", 4 + len(body)) + body


STREAM = (
    message(b"R", b"\x00\x00\x00\x00")
    + message(b"S", b"server_version\x0015\x00")
    + message(b"K", struct.pack("!i", 99) + b"SECR")
    + message(b"D", b"x" * 5000)
    + message(b"Z", b"I")
)


@pytest.mark.parametrize("step", [1, 2, 3, 5, 7, 64, 4096, len(STREAM)])
def test_framer_finds_every_message_whatever_the_chunking(step: int) -> None:
    framer = wire.MessageFramer(keep=b"KZ")
    found = []
    for i in range(0, len(STREAM), step):
        found += framer.feed(STREAM[i:i + step])
    assert [(chr(t), body) for t, body in found] == [
        ("R", None), ("S", None), ("K", struct.pack("!i", 99) + b"SECR"), ("D", None), ("Z", b"I")]


def test_framer_skips_kept_types_over_the_size_cap() -> None:
    framer = wire.MessageFramer(keep=b"E", max_body=10)
    assert framer.feed(message(b"E", b"y" * 11) + message(b"E", b"ok")) == [(69, None), (69, b"ok")]


def test_framer_with_a_limit_looks_no_further_and_is_then_spent() -> None:
    framer = wire.MessageFramer(keep=b"KZ")
    # What follows the second message is not even looked at: a bad length there goes unseen.
    assert framer.feed(STREAM + b"Z\x00\x00\x00\x02", limit=2) == [(ord("R"), None), (ord("S"), None)]
    with pytest.raises(RuntimeError, match="limit"):
        framer.feed(STREAM)
    assert wire.MessageFramer(keep=b"KZ").feed(STREAM, limit=9) == wire.MessageFramer(keep=b"KZ").feed(STREAM)


def test_framer_rejects_impossible_length() -> None:
    with pytest.raises(ProtocolError):
        wire.MessageFramer(keep=b"").feed(b"Z\x00\x00\x00\x02")


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(b"DEKZCT"), st.binary(max_size=300)), max_size=12),
       st.lists(st.integers(min_value=1, max_value=600), min_size=1, max_size=30))
def test_framer_chunking_never_changes_the_result(msgs: list, cuts: list[int]) -> None:
    stream = b"".join(message(bytes([t]), body) for t, body in msgs)
    expected = [(t, body if t in b"KZ" else None) for t, body in msgs]
    framer = wire.MessageFramer(keep=b"KZ")
    found, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        found += framer.feed(stream[pos:pos + step])
        pos += step
        i += 1
    assert found == expected


def test_error_response_round_trip() -> None:
    data = wire.error_response("53300", "queue full", detail="d", hint="h")
    assert data[:1] == b"E"
    assert struct.unpack("!i", data[1:5])[0] == len(data) - 1
    assert wire.parse_fields(data[5:]) == {"S": "FATAL", "V": "FATAL", "C": "53300",
                                           "M": "queue full", "D": "d", "H": "h"}


def test_backend_key_data() -> None:
    assert wire.parse_backend_key(struct.pack("!i", 7) + b"abcd") == (7, b"abcd")
    with pytest.raises(ProtocolError):
        wire.parse_backend_key(b"\x00\x00")


def test_inside_tls_no_negotiation_starts_again() -> None:
    with pytest.raises(ProtocolError, match="SSLRequest sent twice"):
        events_of(SSL + STARTUP, encrypted=True)
    with pytest.raises(ProtocolError, match="invalid length"):
        events_of(TLS_HELLO, encrypted=True)  # not taken for a TLS hello inside TLS
    [event] = events_of(STARTUP, encrypted=True)[0]
    assert isinstance(event, wire.StartupMessage)

"""A relay half's per-chunk work (relay.PyPump, and _walker.Pump in C), pure."""

from __future__ import annotations

import gc
from typing import Any

import pytest

from slotproxy import relay

from .conftest import PUMPS


@pytest.fixture(params=PUMPS)
def pump(request: pytest.FixtureRequest) -> type:
    return request.param


def test_each_chunk_is_counted_shown_then_written_in_order(pump: type) -> None:
    seen: list[tuple[str, bytes]] = []
    half = pump(lambda d: seen.append(("write", d)), lambda d: seen.append(("observe", d)))
    half.data_received(b"abc")
    half.data_received(b"")
    half.data_received(b"de")
    assert seen == [("observe", b"abc"), ("write", b"abc"), ("observe", b""), ("write", b""),
                    ("observe", b"de"), ("write", b"de")]
    assert half.count == 5


def test_without_an_observer_chunks_are_only_written(pump: type) -> None:
    written: list[bytes] = []
    half = pump(written.append)
    half.data_received(b"x" * 70_000)
    half.observer = written.append  # the relay switches observers as a session starts
    half.data_received(b"y")
    half.observer = None
    half.data_received(b"z")
    assert written == [b"x" * 70_000, b"y", b"y", b"z"] and half.count == 70_002


def test_an_observer_may_replace_itself_while_it_runs(pump: type) -> None:
    got: list[bytes] = []

    class Startup:  # as the session's startup observer hands over to the walker
        def observe(self, data: bytes) -> None:
            half.observer = got.append  # drops the last reference to this bound method
            gc.collect()
            got.append(b"startup:" + data)

    half = pump(lambda d: None, Startup().observe)
    half.data_received(b"1")
    half.data_received(b"2")
    assert got == [b"startup:1", b"2"]


def test_an_error_in_the_observer_stops_the_chunk_before_it_is_written(pump: type) -> None:
    written: list[bytes] = []

    def broken(data: bytes) -> Any:
        raise ValueError("observer failed")

    half = pump(written.append, broken)
    with pytest.raises(ValueError, match="observer failed"):
        half.data_received(b"abc")
    assert written == []


@pytest.mark.skipif(relay.CompiledPump is None, reason="slotproxy._walker was not built")
def test_a_compiled_pump_made_without_init_raises_instead_of_crashing() -> None:
    bare = relay.CompiledPump.__new__(relay.CompiledPump)
    with pytest.raises(RuntimeError, match="before __init__"):
        bare.data_received(b"abc")
    assert bare.count == 0 and bare.observer is None

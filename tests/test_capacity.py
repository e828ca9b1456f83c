"""The capacity rule and the reading of a poll, pure."""

from __future__ import annotations

from slotproxy import capacity
from slotproxy.capacity import ServerView
from slotproxy.monitor import OwnSessions, normalize_host, read_view


def view(backends: int, own: int = 0, max_connections: int = 10, superuser: int = 3,
         reserved: int = 0, peers: int = 1) -> ServerView:
    return ServerView(max_connections, superuser, reserved, backends, own, peers)


def test_capacity_is_usable_minus_external() -> None:
    snap = capacity.from_view(view(backends=6, own=1), fixed=None, headroom=0)
    assert (snap.usable, snap.external, snap.capacity) == (7, 5, 2)


def test_reserved_connections_and_headroom_are_left_alone() -> None:
    snap = capacity.from_view(view(backends=0, reserved=2), fixed=None, headroom=1)
    assert (snap.usable, snap.capacity) == (4, 4)


def test_fixed_cap_bounds_it() -> None:
    assert capacity.from_view(view(backends=0), fixed=3, headroom=0).capacity == 3


def test_never_negative() -> None:
    assert capacity.from_view(view(backends=10), fixed=None, headroom=0).capacity == 0


def test_blind_falls_back_to_the_fixed_cap() -> None:
    assert capacity.blind(5, None, "refused").capacity == 5


def test_blind_with_auto_keeps_the_last_capacity_seen_or_none() -> None:
    seen = capacity.from_view(view(backends=2), fixed=None, headroom=0)
    assert capacity.blind(None, seen, "lost").capacity == 5
    assert capacity.blind(None, None, "never connected").capacity is None


def test_snapshot_change_ignores_own() -> None:
    a = capacity.from_view(view(backends=3, own=1), fixed=None, headroom=0)
    b = capacity.from_view(view(backends=4, own=2), fixed=None, headroom=0)
    c = capacity.from_view(view(backends=4, own=1), fixed=None, headroom=0)
    assert a.same_as(b) and not a.same_as(c)


def row(pid: int | None, addr: str | None = None, port: int | None = None, monitor: bool = False) -> dict:
    return {"max_connections": 20, "superuser_reserved": 3, "reserved": 2,
            "pid": pid, "addr": addr, "port": port, "is_monitor": monitor}


def test_read_view_matches_own_sessions_by_pid_or_endpoint() -> None:
    own = OwnSessions(by_pid={101: "s1"}, by_endpoint={("127.0.0.1", 40001): "s2"})
    rows = [
        row(101, None, None),  # ours by pid (address hidden from an unprivileged role)
        row(102, "127.0.0.1", 40001),  # ours by endpoint (still authenticating: no pid known)
        row(103, "127.0.0.1", 40002),  # someone else
        row(104, "10.0.0.9", 5555, monitor=True),  # a monitor: ours or a peer's, external
    ]
    v, matched = read_view(rows, own)
    assert matched == {"s1", "s2"}
    assert (v.client_backends, v.own, v.peers) == (4, 2, 1)
    assert (v.max_connections, v.superuser_reserved, v.reserved) == (20, 3, 2)


def test_read_view_of_a_server_without_client_backends() -> None:
    v, matched = read_view([row(None)], OwnSessions({}, {}))
    assert (v.client_backends, v.own, v.peers, matched) == (0, 0, 1, set())


def test_addresses_compare_in_one_form() -> None:
    assert normalize_host("::ffff:127.0.0.1") == "127.0.0.1"
    assert normalize_host("0:0:0:0:0:0:0:1") == "::1"
    assert normalize_host("fe80::1%eth0") == "fe80::1"

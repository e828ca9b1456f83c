"""How many server sessions this proxy may hold, from what the server says. Pure.

    usable   = max_connections - superuser_reserved - reserved - headroom
    capacity = min(max_backend_slots, usable - external)

`external` is every client backend the server reports that is not one of
ours (other applications, psql sessions, other proxies, our own monitor).
Our own sessions are counted live by admission, between polls too.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ServerView:
    """One poll of the server."""

    max_connections: int
    superuser_reserved: int
    reserved: int  # reserved_connections, PostgreSQL 16+; 0 before
    client_backends: int
    own: int  # of the client backends, how many are this proxy's sessions
    peers: int  # slotproxy monitors connected, ours included


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The capacity this proxy admits by, and where it came from."""

    capacity: int | None  # None: no limit (max_backend_slots = "auto" and never seen)
    blind: bool
    max_connections: int | None = None
    superuser_reserved: int | None = None
    reserved: int | None = None
    headroom: int = 0
    usable: int | None = None
    external: int | None = None
    own: int = 0
    peers: int = 1
    why: str = ""

    def describe(self) -> str:
        limit = "unlimited" if self.capacity is None else str(self.capacity)
        if self.blind:
            return f"capacity {limit} (monitor blind: {self.why})"
        if self.usable is None:
            return f"capacity {limit} (admission.max_backend_slots, no monitor)"
        return (f"capacity {limit}: max_connections={self.max_connections} "
                f"reserved={self.superuser_reserved}+{self.reserved} headroom={self.headroom} "
                f"usable={self.usable} external={self.external} own={self.own} peers={self.peers}")

    def source(self, fixed: int | None) -> str:
        """What set this capacity, for a message to an operator: a key, or the server."""
        if self.blind:
            if fixed is not None:
                return "admission.max_backend_slots; the monitor is blind"
            if self.capacity is None:
                return "no cap: the monitor is blind and has not seen the server yet"
            return "the last capacity the monitor saw; it is blind now"
        if self.usable is None or (fixed is not None and self.capacity == fixed):
            return "admission.max_backend_slots"
        return (f"the server's free slots as the monitor saw them: {self.usable} usable, "
                f"{self.external} taken by other clients")

    def same_as(self, other: Snapshot | None) -> bool:
        """Equal apart from `own`, which moves with every session."""
        if other is None:
            return False
        return (self.capacity, self.blind, self.max_connections, self.superuser_reserved,
                self.reserved, self.headroom, self.external, self.peers) == (
                other.capacity, other.blind, other.max_connections, other.superuser_reserved,
                other.reserved, other.headroom, other.external, other.peers)


def from_view(view: ServerView, fixed: int | None, headroom: int) -> Snapshot:
    usable = view.max_connections - view.superuser_reserved - view.reserved - headroom
    external = view.client_backends - view.own
    live = max(0, usable - external)
    return Snapshot(
        capacity=live if fixed is None else min(fixed, live),
        blind=False,
        max_connections=view.max_connections,
        superuser_reserved=view.superuser_reserved,
        reserved=view.reserved,
        headroom=headroom,
        usable=usable,
        external=external,
        own=view.own,
        peers=view.peers,
    )


def blind(fixed: int | None, seen: Snapshot | None, why: str) -> Snapshot:
    """Without a view: the fixed cap, or with "auto" the capacity of the last view `seen`
    (else no limit), for as long as the monitor stays blind."""
    if fixed is not None:
        capacity: int | None = fixed
    elif seen is not None:
        capacity = seen.capacity
    else:
        capacity = None
    return Snapshot(capacity=capacity, blind=True, why=why)

"""Who may take a server slot, who waits, who is refused. Pure: time is passed in.

One `Admission` per server. A client's `Ticket` moves between two collections:
the queue (waiting, oldest first) and the holders (admitted: connecting or
relaying). Counts are the sizes of those collections.

When the server refuses a connection before anything reached the client
(pre-auth 53300, 57P03, refused TCP connect) the ticket goes back to the
front of the queue and admission holds off for a capped exponential backoff.
When the hold ends, one ticket is admitted as a probe; only its success
reopens admission for the rest. A session of ours ending is a slot really
freed on the server, so it starts a probe at once.
"""

from __future__ import annotations

import bisect
import enum
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any


class State(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    HOLDING = "holding"
    DONE = "done"


class Ticket:
    """One client's place: in the queue, then holding a slot."""

    __slots__ = ("seq", "queued_at", "admitted_at", "state", "info", "waker")

    def __init__(self, info: Any = None) -> None:
        self.seq = -1
        self.queued_at = 0.0
        self.admitted_at: float | None = None
        self.state = State.NEW
        self.info = info  # the client's identity, for logs and status
        self.waker: Any = None  # set by the gate while the ticket waits

    def __lt__(self, other: Ticket) -> bool:
        return self.seq < other.seq

    def __repr__(self) -> str:
        return f"<Ticket {self.seq} {self.state.value}>"


class Decision(enum.Enum):
    ADMITTED = "admitted"
    QUEUED = "queued"
    QUEUE_FULL = "queue_full"


@dataclass(frozen=True, slots=True)
class Limits:
    max_slots: int
    max_queue: int


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = 0.05
    cap: float = 1.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.first * 2 ** (failures - 1))


class Admission:
    """One server's slot budget and its waiting clients."""

    def __init__(self, limits: Limits, backoff: Backoff = Backoff()) -> None:
        self.limits = limits
        self.backoff = backoff
        self.holders: set[Ticket] = set()
        self._queue: dict[Ticket, None] = {}  # arrival order; O(1) removal
        self._returning: list[Ticket] = []  # refused by the server; by seq, served first
        self._seq = itertools.count()
        self.failures = 0  # consecutive server refusals
        self.blocked_until: float | None = None
        self.probe: Ticket | None = None

    # -- what operators see -------------------------------------------------

    @property
    def waiting(self) -> int:
        return len(self._returning) + len(self._queue)

    def waiters(self) -> Iterator[Ticket]:
        """Waiting tickets in the order they will be admitted."""
        yield from self._returning
        yield from self._queue

    @property
    def blocked(self) -> bool:
        return self.blocked_until is not None or self.probe is not None

    # -- transitions ----------------------------------------------------------

    def arrive(self, ticket: Ticket, now: float) -> Decision:
        assert ticket.state is State.NEW
        ticket.seq = next(self._seq)
        ticket.queued_at = now
        if not self.waiting and self._has_room():
            self._hold(ticket, now)
            return Decision.ADMITTED
        if self.waiting >= self.limits.max_queue:
            ticket.state = State.DONE
            return Decision.QUEUE_FULL
        ticket.state = State.WAITING
        self._queue[ticket] = None
        return Decision.QUEUED

    def leave(self, ticket: Ticket) -> None:
        """A waiting client gave up (hung up, timed out): it leaves the queue."""
        assert ticket.state is State.WAITING
        if ticket in self._queue:
            del self._queue[ticket]
        else:
            self._returning.remove(ticket)
        ticket.state = State.DONE

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A holder's server connection is closed: its slot is free again."""
        assert ticket.state is State.HOLDING
        self.holders.discard(ticket)
        ticket.state = State.DONE
        if ticket is self.probe:
            self.probe = None
        elif self.blocked_until is not None:
            # A slot of ours really came free on the server: try it now.
            self.blocked_until = None
        return self._fill(now)

    def answered(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A holder's server accepted the connection (its first answer was no refusal)."""
        if ticket is self.probe:
            self.probe = None
            self.failures = 0
            return self._fill(now)
        if not self.blocked:
            self.failures = 0
        return []

    def refused(self, ticket: Ticket, now: float) -> None:
        """The server refused a holder's connection before answering it: back to the front."""
        assert ticket.state is State.HOLDING
        self.holders.discard(ticket)
        ticket.state = State.WAITING
        ticket.admitted_at = None
        bisect.insort(self._returning, ticket)
        if ticket is self.probe:
            self.probe = None
        if self.blocked_until is None:
            # Connections admitted together and refused together count once.
            self.failures += 1
            self.blocked_until = now + self.backoff.delay(self.failures)

    def unblock(self, now: float) -> list[Ticket]:
        """The backoff is over: admit one probe."""
        if self.blocked_until is not None and now >= self.blocked_until:
            self.blocked_until = None
            return self._fill(now)
        return []

    def set_limits(self, limits: Limits, now: float) -> list[Ticket]:
        self.limits = limits
        return self._fill(now)

    def drain(self) -> list[Ticket]:
        """Remove every waiter (shutdown); returns them in queue order."""
        gone = list(self.waiters())
        self._returning.clear()
        self._queue.clear()
        for ticket in gone:
            ticket.state = State.DONE
        return gone

    # -- internals ------------------------------------------------------------

    def _has_room(self) -> bool:
        return len(self.holders) < self.limits.max_slots and not self.blocked

    def _hold(self, ticket: Ticket, now: float) -> None:
        ticket.state = State.HOLDING
        ticket.admitted_at = now
        self.holders.add(ticket)
        if self.failures:
            # After refusals, one connection tests the server before the rest.
            self.probe = ticket

    def _fill(self, now: float) -> list[Ticket]:
        admitted: list[Ticket] = []
        while self.waiting and self._has_room():
            if self._returning:
                ticket = self._returning.pop(0)
            else:
                ticket = next(iter(self._queue))
                del self._queue[ticket]
            self._hold(ticket, now)
            admitted.append(ticket)
        return admitted

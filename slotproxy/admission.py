"""Who may take a server slot, who waits, who is refused. Pure: time is passed in.

One `Admission` per server, with one `Lane` per class of clients. A client's
`Ticket` moves between two collections of its lane: the queue (waiting,
oldest first) and the holders (admitted: connecting or relaying). Counts are
the sizes of those collections and of the server-wide subsets `connecting`
(startups in flight) and `unseen` (holders no server poll has shown yet).

When a slot frees, the lane served next is: first one below its `min_slots`
(the furthest below), else the one with the lowest held/weight; ties go to
the lane whose first waiter came first. Lanes at their `max_slots` wait.

A new ticket is admitted while all of these hold:
- fewer holders than `max_slots` (None: no cap);
- fewer startups in flight than `max_connecting` (no fork storms);
- fewer unseen holders than `max_unseen`, when that is set (other proxies
  share the server and cannot see our newest sessions yet);
- admission is not blocked after a server refusal.

When the server refuses a connection before anything reached the client
(53300, 57P03, 57P01/57P02 from a backend ended while it started, a refused
TCP connect) the ticket goes back to the front of
the queue and admission blocks: until the next poll of the server when a
monitor sees it, else for a capped exponential backoff. Then one ticket is
admitted as a probe; only its success reopens admission for the rest. A
session of ours ending is a slot really freed on the server, so it starts a
probe at once.
"""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from .config import DEFAULT_CLASS, ClassConfig


class State(enum.Enum):
    NEW = "new"
    WAITING = "waiting"
    HOLDING = "holding"
    DONE = "done"


class Ticket:
    """One client's place: in the queue, then holding a slot."""

    __slots__ = ("admitted_at", "info", "lane", "queued_at", "seq", "showable", "state", "waker")

    def __init__(self, info: Any = None, lane: str = DEFAULT_CLASS, showable: bool = True) -> None:
        self.lane = lane  # the name of its class
        # Whether a poll can be counted on to show it (TLS passthrough hides its backend pid).
        self.showable = showable
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
    max_slots: int | None
    max_queue: int
    max_connecting: int = 8
    max_unseen: int | None = None


@dataclass(frozen=True, slots=True)
class Backoff:
    first: float = 0.05
    cap: float = 1.0

    def delay(self, failures: int) -> float:
        return min(self.cap, self.first * 2 ** (failures - 1))


UNTIL_NEXT_VIEW = math.inf  # blocked until a poll of the server says otherwise


class Lane:
    """One class's part of a server: its waiters and its holders."""

    __slots__ = ("config", "holders", "queue", "returning")

    def __init__(self, config: ClassConfig) -> None:
        self.config = config
        self.queue: dict[Ticket, None] = {}  # arrival order; O(1) removal
        self.returning: list[Ticket] = []  # refused by the server; by seq, served first
        self.holders: set[Ticket] = set()

    @property
    def waiting(self) -> int:
        return len(self.returning) + len(self.queue)

    def waiters(self) -> Iterator[Ticket]:
        yield from self.returning
        yield from self.queue

    def head(self) -> Ticket:
        return self.returning[0] if self.returning else next(iter(self.queue))

    def pop(self) -> Ticket:
        if self.returning:
            return self.returning.pop(0)
        ticket = next(iter(self.queue))
        del self.queue[ticket]
        return ticket

    def remove(self, ticket: Ticket) -> None:
        if ticket in self.queue:
            del self.queue[ticket]
        else:
            self.returning.remove(ticket)

    @property
    def full(self) -> bool:
        cap = self.config.max_slots
        return cap is not None and len(self.holders) >= cap


class Admission:
    """One server's slot budget and its waiting clients, in lanes by class."""

    def __init__(self, limits: Limits, classes: Sequence[ClassConfig] = (),
                 backoff: Backoff = Backoff()) -> None:
        self.limits = limits
        self.backoff = backoff
        self.lanes: dict[str, Lane] = {}
        self.set_classes(classes)
        self.holders: set[Ticket] = set()
        self.connecting: set[Ticket] = set()  # holders whose server has not answered yet
        self.unseen: set[Ticket] = set()  # holders no poll of the server has shown yet
        self._seq = itertools.count()
        self.failures = 0  # consecutive server refusals
        self.blocked_until: float | None = None
        self.probe: Ticket | None = None
        self.viewing = False  # a monitor sees the server: refusals wait for its next poll
        self.peak_connecting = 0
        self.paused = False  # PAUSE: admit nobody; waiters keep their places and deadlines

    def set_classes(self, classes: Sequence[ClassConfig]) -> None:
        """One lane per class; a lane keeps its tickets when its class stays.

        A lane whose class is gone (reload) stays while it still has clients:
        its waiters are served and its holders released as usual; nobody new
        is classified into it.
        """
        configs = list(classes) or [ClassConfig(DEFAULT_CLASS, max_queue=self.limits.max_queue)]
        lanes = {}
        for config in configs:
            lane = self.lanes.get(config.name) or Lane(config)
            lane.config = config
            lanes[config.name] = lane
        for name, lane in self.lanes.items():
            if name not in lanes and (lane.waiting or lane.holders):
                lanes[name] = lane
        self.lanes = lanes

    # -- what operators see -------------------------------------------------

    @property
    def waiting(self) -> int:
        return sum(lane.waiting for lane in self.lanes.values())

    def waiters(self) -> Iterator[Ticket]:
        """Every waiting ticket, oldest first."""
        return iter(sorted((t for lane in self.lanes.values() for t in lane.waiters()),
                           key=lambda t: t.seq))

    @property
    def blocked(self) -> bool:
        return self.blocked_until is not None or self.probe is not None

    def reclaimable(self, candidates: Sequence[Ticket], ending: Iterable[Ticket] = ()) -> list[Ticket]:
        """Of `candidates` (holders idle too long, first to end first), those whose
        ending would let a waiter in; `ending` are holders already on their way out.

        A waiter in a lane at its max_slots takes only a slot of its own lane. A
        waiter in another lane takes any slot, but only a full (or blocked)
        server keeps it waiting for one. While paused, ending sessions admits nobody.
        """
        if self.paused:
            return []
        cap = self.limits.max_slots
        server_full = (cap is not None and len(self.holders) >= cap) or self.blocked
        own = {name: lane.waiting for name, lane in self.lanes.items() if lane.full and lane.waiting}
        others = sum(lane.waiting for name, lane in self.lanes.items() if name not in own) \
            if server_full else 0
        left = [others]

        def lets_in(ticket: Ticket) -> bool:
            if own.get(ticket.lane):
                own[ticket.lane] -= 1
                return True
            if left[0]:
                left[0] -= 1
                return True
            return False

        for ticket in ending:
            lets_in(ticket)
        return [ticket for ticket in candidates if lets_in(ticket)]

    # -- transitions ----------------------------------------------------------

    def arrive(self, ticket: Ticket, now: float) -> Decision:
        assert ticket.state is State.NEW
        lane = self.lanes[ticket.lane]
        ticket.seq = next(self._seq)
        ticket.queued_at = now
        ticket.state = State.WAITING
        lane.queue[ticket] = None
        self._fill(now)  # admits it if its lane may have a slot now; nobody else could
        if ticket.state is State.HOLDING:
            return Decision.ADMITTED
        if lane.waiting > lane.config.max_queue:
            lane.remove(ticket)
            ticket.state = State.DONE
            return Decision.QUEUE_FULL
        return Decision.QUEUED

    def leave(self, ticket: Ticket) -> None:
        """A waiting client gave up (hung up, timed out): it leaves the queue."""
        assert ticket.state is State.WAITING
        self.lanes[ticket.lane].remove(ticket)
        ticket.state = State.DONE

    def release(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A holder's server connection is closed: its slot is free again."""
        assert ticket.state is State.HOLDING
        self._drop(ticket)
        ticket.state = State.DONE
        if ticket is self.probe:
            self.probe = None
        elif self.blocked_until is not None:
            # A slot of ours really came free on the server: try it now.
            self.blocked_until = None
        return self._fill(now)

    def answered(self, ticket: Ticket, now: float) -> list[Ticket]:
        """A holder's server accepted the connection (its first answer was no refusal)."""
        self.connecting.discard(ticket)
        if ticket is self.probe:
            self.probe = None
            self.failures = 0
        elif not self.blocked:
            self.failures = 0
        return self._fill(now)

    def refused(self, ticket: Ticket, now: float) -> None:
        """The server refused a holder's connection before answering it: back to the front."""
        assert ticket.state is State.HOLDING
        self._drop(ticket)
        ticket.state = State.WAITING
        ticket.admitted_at = None
        bisect.insort(self.lanes[ticket.lane].returning, ticket)
        if ticket is self.probe:
            self.probe = None
        if self.blocked_until is None:
            # Connections admitted together and refused together count once.
            self.failures += 1
            self.blocked_until = (UNTIL_NEXT_VIEW if self.viewing
                                  else now + self.backoff.delay(self.failures))

    def unblock(self, now: float) -> list[Ticket]:
        """The backoff is over: admit one probe."""
        if self.blocked_until is not None and now >= self.blocked_until:
            self.blocked_until = None
            return self._fill(now)
        return []

    def update(self, limits: Limits, now: float, *, seen: Iterable[Ticket] | None = None,
               viewing: bool | None = None) -> list[Ticket]:
        """New limits; after a poll of the server, also which holders it showed.

        A poll ends a block that waited for it. Losing the view turns such a
        block into a backoff.
        """
        self.limits = limits
        if viewing is not None and viewing != self.viewing:
            self.viewing = viewing
            if not viewing and self.blocked_until == UNTIL_NEXT_VIEW:
                self.blocked_until = now + self.backoff.delay(max(1, self.failures))
        if seen is not None:
            self.unseen.difference_update(seen)
            if self.blocked_until == UNTIL_NEXT_VIEW:
                self.blocked_until = None
        return self._fill(now)

    def pause(self) -> None:
        self.paused = True

    def resume(self, now: float) -> list[Ticket]:
        self.paused = False
        return self._fill(now)

    def drain(self) -> list[Ticket]:
        """Remove every waiter (shutdown); returns them oldest first."""
        gone = list(self.waiters())
        for lane in self.lanes.values():
            lane.returning.clear()
            lane.queue.clear()
        for ticket in gone:
            ticket.state = State.DONE
        return gone

    # -- internals ------------------------------------------------------------

    def _has_room(self) -> bool:
        limits = self.limits
        return ((limits.max_slots is None or len(self.holders) < limits.max_slots)
                and len(self.connecting) < limits.max_connecting
                and (limits.max_unseen is None or len(self.unseen) < limits.max_unseen)
                and not self.blocked and not self.paused)

    def _pick(self) -> Lane | None:
        """The lane a free slot goes to (see the module doc)."""
        best: Lane | None = None
        best_key: tuple[int, float, int] | None = None
        for lane in self.lanes.values():
            if not lane.waiting or lane.full:
                continue
            held = len(lane.holders)
            if held < lane.config.min_slots:
                key = (0, held - lane.config.min_slots, lane.head().seq)
            else:
                key = (1, held / lane.config.weight, lane.head().seq)
            if best_key is None or key < best_key:
                best, best_key = lane, key
        return best

    def _hold(self, ticket: Ticket, now: float) -> None:
        ticket.state = State.HOLDING
        ticket.admitted_at = now
        self.holders.add(ticket)
        self.lanes[ticket.lane].holders.add(ticket)
        self.connecting.add(ticket)
        if ticket.showable:  # else it would hold max_unseen up until it ends
            self.unseen.add(ticket)
        self.peak_connecting = max(self.peak_connecting, len(self.connecting))
        if self.failures:
            # After refusals, one connection tests the server before the rest.
            self.probe = ticket

    def _drop(self, ticket: Ticket) -> None:
        self.holders.discard(ticket)
        self.lanes[ticket.lane].holders.discard(ticket)
        self.connecting.discard(ticket)
        self.unseen.discard(ticket)

    def _fill(self, now: float) -> list[Ticket]:
        admitted: list[Ticket] = []
        while True:
            # Who would get a slot first: most calls find nobody waiting, and stop there.
            lane = self._pick()
            if lane is None or not self._has_room():
                break
            ticket = lane.pop()
            self._hold(ticket, now)
            admitted.append(ticket)
        return admitted

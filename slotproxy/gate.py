"""The asyncio face of admission: waiters sleep on futures, backoff runs on a timer.

A waiter that is cancelled (its client hung up, its deadline passed) leaves
the queue in `wait` itself, so no path can leave a ghost behind.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

from .admission import UNTIL_NEXT_VIEW, Admission, Decision, Limits, State, Ticket
from .errors import ClientError, Reason


class Rerouted(Exception):
    """A waiter's route changed (reload): it leaves this queue to follow it."""


def shutdown_error() -> ClientError:
    return ClientError(Reason.SHUTDOWN, "57P01", "slotproxy is shutting down",
                       hint="Connect again in a moment.")


class Gate:
    """Admission for one server, with futures for the waiters and a backoff timer."""

    def __init__(self, admission: Admission) -> None:
        self.admission = admission
        self.closed = False
        self.server_refusals = 0  # connections the server refused before answering
        self.post_auth_refusals = 0  # refusals relayed after a password exchange
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._emptied: asyncio.Future[None] | None = None

    def enter(self, ticket: Ticket) -> bool:
        """A new client asks for a slot: True if it holds one now, False if it waits.

        Raises ClientError when it is refused (queue full, shutting down).
        """
        if self.closed:
            raise shutdown_error()
        decision = self.admission.arrive(ticket, self._now())
        if decision is Decision.QUEUE_FULL:
            raise self._queue_full(ticket.lane)
        return decision is Decision.ADMITTED

    async def wait(self, ticket: Ticket) -> None:
        """Return once `ticket` holds a slot. Raises ClientError when refused."""
        if self.closed:
            if ticket.state is State.WAITING:  # refused by the server just before
                self.admission.leave(ticket)
            raise shutdown_error()
        if ticket.state is State.HOLDING:
            return
        waker = self.loop.create_future()
        ticket.waker = waker
        try:
            await waker
        except BaseException:
            if ticket.state is State.WAITING:
                self.leave(ticket)
            elif ticket.state is State.HOLDING:
                self.release(ticket)  # admitted just as we were cancelled
            raise
        finally:
            ticket.waker = None

    def leave(self, ticket: Ticket) -> None:
        """A waiter gives up its place."""
        self.admission.leave(ticket)
        self._check_empty()

    def release(self, ticket: Ticket) -> None:
        self._wake(self.admission.release(ticket, self._now()))
        self._check_empty()

    async def emptied(self) -> None:
        """Return once nobody holds a slot here or waits for one."""
        while self.admission.holders or self.admission.waiting:
            if self._emptied is None or self._emptied.done():
                self._emptied = self.loop.create_future()
            await asyncio.shield(self._emptied)  # shared: one waiter's cancel is not the others'

    def _check_empty(self) -> None:
        if self._emptied is not None and not (self.admission.holders or self.admission.waiting):
            if not self._emptied.done():
                self._emptied.set_result(None)

    def answered(self, ticket: Ticket) -> None:
        self._wake(self.admission.answered(ticket, self._now()))

    def refused(self, ticket: Ticket) -> None:
        """The server refused before answering: back to the front, back off."""
        self.server_refusals += 1
        self.admission.refused(ticket, self._now())
        self._schedule()

    def update(self, limits: Limits, *, seen: Iterable[Ticket] | None = None,
               viewing: bool | None = None) -> None:
        """New limits, and after a poll of the server the holders it showed."""
        self._wake(self.admission.update(limits, self._now(), seen=seen, viewing=viewing))

    def pause(self) -> None:
        self.admission.pause()

    def resume(self) -> None:
        self._wake(self.admission.resume(self._now()))

    def reroute(self, ticket: Ticket) -> None:
        """Wake a waiter with Rerouted; it leaves this queue as it wakes."""
        if ticket.waker is not None and not ticket.waker.done():
            ticket.waker.set_exception(Rerouted())

    def close(self) -> None:
        """Refuse every waiter with 57P01 and admit nobody from now on."""
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        error = shutdown_error()
        for ticket in self.admission.drain():
            if ticket.waker is not None and not ticket.waker.done():
                ticket.waker.set_exception(error)

    def _queue_full(self, lane_name: str) -> ClientError:
        lane = self.admission.lanes[lane_name]
        key = lane.config.key("max_queue")
        limit = lane.config.max_queue
        of_class = "" if lane.config.implicit else f" of class {lane.config.name}"
        if limit == 0:
            message = f"slotproxy: every server slot is in use and nobody may wait ({key} = 0)"
        else:
            message = (f"slotproxy queue full: {lane.waiting} clients{of_class} already waiting "
                       f"for a server slot ({key} = {limit})")
        return ClientError(Reason.QUEUE_FULL, "53300", message, hint=f"Retry later, or raise {key}.")

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _now(self) -> float:
        return self.loop.time()

    def _wake(self, admitted: list[Ticket]) -> None:
        for ticket in admitted:
            if ticket.waker is not None and not ticket.waker.done():
                ticket.waker.set_result(None)
        self._schedule()

    def _schedule(self) -> None:
        when = self.admission.blocked_until
        if when == UNTIL_NEXT_VIEW:
            when = None  # the next poll of the server lifts it
        if when == self._timer_at:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = when
        if when is not None and not self.closed:
            self._timer = self.loop.call_at(when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        self._wake(self.admission.unblock(self._now()))

"""`asyncio.timeout_at` for a caller that already holds its loop and task.

The same cancellation rules as asyncio.Timeout (Python 3.11): on expiry the
task is cancelled, and the CancelledError becomes TimeoutError on the way out
unless someone else cancelled the task too. Taking the loop and task from the
caller saves the lookups asyncio.timeout makes on entry and exit; on Python
3.11 each of those is a getpid() system call, and a session enters several of
these per connection. A plain `with`: entering and leaving need no await, and
`async with` would make two coroutines each time.
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class deadline:  # lower case: used like asyncio.timeout_at
    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task, when: float) -> None:
        self._loop = loop
        self._task = task
        self._when = when
        self._handle: asyncio.Handle | None = None
        self._expired = False
        self._cancelling = 0

    def __enter__(self) -> deadline:
        self._cancelling = self._task.cancelling()
        if self._when <= self._loop.time():
            self._handle = self._loop.call_soon(self._on_timeout)
        else:
            self._handle = self._loop.call_at(self._when, self._on_timeout)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired and self._task.uncancel() <= self._cancelling \
                and exc_type is asyncio.CancelledError:
            raise TimeoutError from exc

    def _on_timeout(self) -> None:
        self._handle = None
        if not self._expired:
            self._expired = True
            self._task.cancel()

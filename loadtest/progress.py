"""The live progress line: rewritten in place on a terminal, one line every few seconds otherwise."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import TextIO

TTY_INTERVAL = 0.5
PLAIN_INTERVAL = 5.0


class Progress:
    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()

    @contextlib.contextmanager
    def showing(self, status: Callable[[], str]) -> Iterator[None]:
        """Show `status()` while the block runs."""
        if not self.enabled:
            yield
            return
        task = asyncio.get_running_loop().create_task(self._show(status))
        try:
            yield
        finally:
            task.cancel()
            self._write(status(), final=True)

    async def _show(self, status: Callable[[], str]) -> None:
        interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        while True:
            await asyncio.sleep(interval)  # refresh rate of the line
            self._write(status())

    def _write(self, text: str, final: bool = False) -> None:
        try:
            if self.tty:
                self.stream.write("\r" + text + "\x1b[K" + ("\n" if final else ""))
            else:
                self.stream.write(text + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # the terminal went away; the run goes on
            self.enabled = False

    def note(self, text: str) -> None:
        if self.enabled:
            self._write(text, final=True) if self.tty else self._write(text)

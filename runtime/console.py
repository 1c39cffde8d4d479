"""The guest's console: streamed to a sink as it comes, with a bounded tail kept for the result.

A guest may print without end (a loop of 1 MiB console writes), so the
hypervisor keeps only the last `TAIL_MAX` bytes; everything is passed on to
the sink (`pvtool run` writes it to stdout) the moment it arrives, and the
total is counted.  A sink that fails (a closed pipe: `pvtool run K | head
-1`) is dropped and the guest runs on; output is never a reason to stop a
guest.
"""
from __future__ import annotations

from typing import Callable

TAIL_MAX = 1 << 20


class Console:
    def __init__(self, sink: Callable[[bytes], None] | None = None, tail_max: int = TAIL_MAX):
        self.sink = sink
        self.tail_max = tail_max
        self._tail = bytearray()
        self.total = 0                 # bytes the guest wrote, all told
        self.sink_error: str | None = None

    def write(self, data: bytes) -> None:
        self.total += len(data)
        self._tail += data
        if len(self._tail) > 2 * self.tail_max:      # trim now and then, not on every byte
            del self._tail[:-self.tail_max]
        if self.sink is not None:
            try:
                self.sink(data)
            except OSError as e:                      # BrokenPipeError and friends: stop passing it on
                self.sink, self.sink_error = None, f"{type(e).__name__}: {e}"

    @property
    def tail(self) -> bytes:
        """The last `tail_max` bytes the guest wrote (all of it if it wrote less)."""
        return bytes(self._tail[-self.tail_max:])

    @property
    def truncated(self) -> bool:
        return self.total > self.tail_max

"""The 8254 programmable interval timer at 0x40-0x43, channel 0 wired to IRQ 0.

The chip counts a 1.193182 MHz input down from a programmed count (a
"divisor"; 0 means 65536).  Time here is the virtual clock's (clock.py), so
a counter is just the virtual time it was loaded at and its count: its
interrupts are deadlines on the clock, and a read of the count is computed
from the time now.

- control word (0x43): channel, access (latch, low byte, high byte, low then
  high), mode, BCD (ignored: counts are binary).  Writing it stops the
  channel until a new count is loaded;
- mode 0 (interrupt on terminal count): one interrupt `count` input ticks
  after the count is loaded; modes 2 (rate generator) and 3 (square wave):
  one interrupt every `count` ticks, the first one period after loading.
  Mode 4 behaves as mode 0; modes 1 and 5 wait for a gate edge, which
  channel 0's gate (tied high) never gives, so they never interrupt;
- a new count takes effect at once (the chip would wait for the current
  period to end in modes 2 and 3);
- reads give the counter's current count, or the value latched by a latch
  command, low byte first when the access mode is low-then-high.

Channels 1 and 2 count the same way but are wired to nothing.  The
read-back command is not modelled (ignored).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..clock import Timer, VirtualClock

PIT_HZ = 1_193_182
BASE = 0x40
CONTROL = 0x43
IRQ = 0
PERIODIC = (2, 3)
ONE_SHOT = (0, 4)


@dataclass
class Counter:
    mode: int = 0
    access: int = 3               # 1 low byte, 2 high byte, 3 low then high
    count: int = 0x10000          # as loaded; 0 is stored as 65536
    start: int | None = None      # virtual ns at loading; None: stopped
    low: int | None = None        # low byte written, high byte awaited
    latched: list[int] = field(default_factory=list)   # bytes a read returns first
    read_high: bool = False       # low-then-high reads: next is the high byte

    def deadline(self, k: int) -> int:
        """Virtual ns of the end of the k-th period after loading (rounded up)."""
        return self.start + -(-k * self.count * 1_000_000_000 // PIT_HZ)

    def current(self, now: int) -> int:
        if self.start is None:
            return self.count & 0xFFFF
        elapsed = (now - self.start) * PIT_HZ // 1_000_000_000
        if self.mode in PERIODIC:
            return (self.count - elapsed % self.count) & 0xFFFF
        return (self.count - elapsed) & 0xFFFF


class Pit8254:
    def __init__(self, clock: VirtualClock, raise_irq: Callable[[int], None]):
        self.clock = clock
        self.raise_irq = raise_irq
        self.counters = [Counter() for _ in range(3)]
        self.timer = clock.add(Timer("PIT channel 0", IRQ, self._expire))

    @property
    def channel0(self) -> Counter:
        return self.counters[0]

    # -- ports --------------------------------------------------------------------
    def io_read(self, port: int, size: int) -> int:
        if port == CONTROL:
            return 0xFF                   # write-only
        c = self.counters[port - BASE]
        if c.latched:
            return c.latched.pop(0)
        value = c.current(self.clock.ticks)
        if c.access == 3:
            high, c.read_high = c.read_high, not c.read_high
            return value >> 8 if high else value & 0xFF
        return value >> 8 if c.access == 2 else value & 0xFF

    def io_write(self, port: int, size: int, value: int) -> None:
        value &= 0xFF
        if port == CONTROL:
            self._control(value)
            return
        n = port - BASE
        c = self.counters[n]
        if c.access == 1:
            self._load(n, value)
        elif c.access == 2:
            self._load(n, value << 8)
        elif c.low is None:
            c.low = value
        else:
            self._load(n, c.low | value << 8)

    def _control(self, value: int) -> None:
        n, access = value >> 6, (value >> 4) & 3
        if n == 3:                        # read-back: not modelled
            return
        c = self.counters[n]
        if access == 0:                   # counter latch
            if not c.latched:
                now = c.current(self.clock.ticks)
                c.latched = [now & 0xFF, now >> 8] if c.access == 3 else \
                    [now >> 8] if c.access == 2 else [now & 0xFF]
            return
        mode = (value >> 1) & 7
        c.mode, c.access = mode - 4 if mode >= 6 else mode, access
        c.start, c.low, c.latched, c.read_high = None, None, [], False
        if n == 0:
            self.clock.arm(self.timer, None)

    def _load(self, n: int, count: int) -> None:
        c = self.counters[n]
        c.count, c.low = count or 0x10000, None
        c.start = self.clock.ticks
        if n == 0 and c.mode in PERIODIC + ONE_SHOT:
            self.clock.arm(self.timer, c.deadline(1))

    # -- the interrupt -------------------------------------------------------------
    def _expire(self, deadline: int) -> int | None:
        self.raise_irq(IRQ)
        c = self.channel0
        if c.mode not in PERIODIC:
            return None
        now = self.clock.ticks
        k = (now - c.start) * PIT_HZ // (c.count * 1_000_000_000) + 1
        while c.deadline(k) <= now:      # the formula's rounding, at most a step or two
            k += 1
        return c.deadline(k)

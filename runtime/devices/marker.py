"""The phase marker at port 0x80 (the PC's POST-code port, which QEMU ignores): per-operation figures.

A kernel brackets a stretch of work so the runtime can report it apart, as a
performance-counter marker would:

    outl(0x80, (n << 8) | id)     start phase `id` (1..255), covering n operations (n may be 0)
    outl(0x80, 0)                 end the current phase

(`outb(0x80, id)` starts a phase of 0 operations.)  Each phase accumulates
the exits by reason, the virtual and host time and the operations of every
stretch marked with its id; `pvtool bench` divides by the operations.  The
exit that carries the end marker is not counted in the phase (it is the
marker's, not the work's); in a PV build the marker travels in a multicall
entry, so its exit is that multicall's.  A start while a phase is open ends
that phase first.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from time import perf_counter

from ..clock import VirtualClock

PORT = 0x80


@dataclass
class Phase:
    id: int
    runs: int = 0                      # stretches marked with this id
    operations: int = 0                # as the kernel declared them
    exits: Counter = field(default_factory=Counter)
    total_exits: int = 0
    virtual_ns: int = 0
    host_seconds: float = 0.0

    def as_dict(self) -> dict:
        return {"runs": self.runs, "operations": self.operations, "exits": self.total_exits,
                "exits_by_reason": dict(self.exits.most_common()), "virtual_ns": self.virtual_ns,
                "host_seconds": round(self.host_seconds, 6)}


class PhaseMarker:
    def __init__(self, stats, clock: VirtualClock):
        self.stats = stats
        self.clock = clock
        self._open: tuple[int, Counter, int, int, float] | None = None   # id, exits, total, ticks, host time

    def io_read(self, port: int, size: int) -> int:
        return 0xFFFFFFFF

    def io_write(self, port: int, size: int, value: int) -> None:
        if self._open is not None:
            self._close()
        if value & 0xFF:
            self._start(value & 0xFF, value >> 8 if size == 4 else 0)

    def _start(self, phase_id: int, operations: int) -> None:
        phase = self.stats.phases.setdefault(phase_id, Phase(phase_id))
        phase.runs += 1
        phase.operations += operations
        stats = self.stats
        self._open = (phase_id, Counter(stats.exits), stats.total_exits, self.clock.ticks, perf_counter())

    def _close(self) -> None:
        phase_id, exits, total, ticks, started = self._open
        self._open = None
        stats = self.stats
        phase = stats.phases[phase_id]
        delta = stats.exits - exits
        if stats.current_reason and delta[stats.current_reason]:
            delta[stats.current_reason] -= 1            # the end marker's own exit
        phase.exits.update(+delta)
        phase.total_exits += sum(delta.values())
        phase.virtual_ns += self.clock.ticks - ticks
        phase.host_seconds += perf_counter() - started

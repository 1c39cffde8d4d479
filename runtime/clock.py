"""The virtual clock behind the guest's time-stamp counter.

Deterministic by construction: it counts no instructions and reads no host
clock.  Every read of the TSC (`rdtsc` trapped, the `rdtsc` hypercall)
advances it by `TSC_STEP` ticks, so two reads are always strictly
increasing and a run gives the same values every time.  The nominal rate
is 1 GHz (one tick per virtual nanosecond); a later issue lets `block`
skip virtual time ahead to the next timer deadline, which is why the clock
is an object of its own and not a counter in the vCPU.

In `bare` mode `rdtsc` is not intercepted: it reads Unicorn's own TSC.
"""
from __future__ import annotations

from dataclasses import dataclass

TSC_HZ = 1_000_000_000
TSC_STEP = 1000          # ticks per read: 1 us of virtual time


@dataclass
class VirtualClock:
    ticks: int = 0

    def read_tsc(self) -> int:
        self.ticks += TSC_STEP
        return self.ticks

    @property
    def now_ns(self) -> int:
        return self.ticks * 1_000_000_000 // TSC_HZ

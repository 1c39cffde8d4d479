"""The virtual clock: the guest's notion of time, and the timers that run on it.

Virtual time is counted in nanoseconds; the guest's time-stamp counter runs
at `TSC_HZ` = 1 GHz, so the TSC *is* the nanosecond count.  The clock reads
no host clock.  It moves only when the hypervisor moves it, by fixed
amounts, so the same run sees the same times (in bare mode too, up to the
instant an interrupt is delivered: at the next exit or slice end):

- every exit costs `EXIT_NS` (1 us: about what a VM exit and its
  emulation cost on real hardware); a guest that polls a device, or makes
  any other hypercall or trapped instruction, sees time pass;
- every read of the TSC (trapped `rdtsc`, the `rdtsc` hypercall, the TSC
  MSR) advances it by `TSC_STEP` more, so two reads are strictly increasing;
- while a timer is armed (or an interrupt waits) the guest runs in slices
  of `SLICE_INSNS` instructions; a slice that ends without a single exit
  counts as `SLICE_NS` of virtual time (one with exits was already paid
  for by them), so a guest that spins without exits still sees time pass
  and its timer interrupts arrive.  Slices are counted instructions, not
  host time, so this too is the same on every run;
- an idle guest (`hlt`, the `block` hypercall) skips straight to the next
  timer deadline that can wake it: idling costs no host time at all.

Timers (the PIT's channel 0, the `set_timer` one-shot) are `Timer` objects
with a deadline; whenever time passes a deadline the timer's `fire` runs
with that deadline and returns the timer's next deadline, or None (a
periodic timer's next deadline is the first period end still ahead: the
periods a big jump skipped coalesce into one interrupt, as on a real PIC
whose request line was already raised).

In `bare` mode `rdtsc` is not intercepted: it reads Unicorn's own TSC.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

TSC_HZ = 1_000_000_000
TSC_STEP = 1000          # ticks per TSC read: 1 us of virtual time
EXIT_NS = 1000           # virtual time one exit costs
SLICE_INSNS = 250_000    # instructions a guest runs before the hypervisor looks again
SLICE_NS = 250_000       # virtual time an exit-free slice counts for: 1 ns an instruction
NEVER = 1 << 63


@dataclass(eq=False)
class Timer:
    name: str
    irq: int                               # the interrupt line it raises
    fire: Callable[[int], int | None]      # deadline that passed -> next deadline or None
    deadline: int | None = None            # None: disarmed


@dataclass
class VirtualClock:
    ticks: int = 0
    timers: list[Timer] = field(default_factory=list)
    next_deadline: int = NEVER             # the earliest armed deadline

    @property
    def now_ns(self) -> int:
        return self.ticks * 1_000_000_000 // TSC_HZ

    def read_tsc(self) -> int:
        self.advance(TSC_STEP)
        return self.ticks

    # -- time passing --------------------------------------------------------
    def advance(self, ns: int) -> None:
        self.ticks += ns
        if self.ticks >= self.next_deadline:
            self._fire_due()

    def skip_to(self, when: int) -> int:
        """Jump forward to `when` (an idle guest); returns the virtual time skipped."""
        skipped = max(0, when - self.ticks)
        self.advance(skipped)
        return skipped

    # -- timers ----------------------------------------------------------------
    def add(self, timer: Timer) -> Timer:
        self.timers.append(timer)
        return timer

    def arm(self, timer: Timer, deadline: int | None) -> None:
        """Set (or with None, cancel) `timer`'s deadline; a deadline already passed fires at once."""
        timer.deadline = deadline
        self._recompute()
        if self.ticks >= self.next_deadline:
            self._fire_due()

    def armed(self) -> list[Timer]:
        return [t for t in self.timers if t.deadline is not None]

    def _fire_due(self) -> None:
        while self.ticks >= self.next_deadline:
            timer = min(self.armed(), key=lambda t: t.deadline)
            timer.deadline = timer.fire(timer.deadline)
            self._recompute()

    def _recompute(self) -> None:
        self.next_deadline = min((t.deadline for t in self.timers if t.deadline is not None), default=NEVER)

"""The machine's parts, declared once: `Vm`, the one struct every part of the runtime takes.

Like lguest's `struct lguest` in lg.h: an exit handler, a mode or the run
loop gets a `Vm` and reaches the guest's memory, MMU, CPU, devices and
clock through it.  This module imports no other part of the runtime but its
exceptions (the field types are named, not imported), so every part can
import it.

`Stop` is how a run ends; `Vm.kill` is the one path that ends it.
"""
from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter
from typing import TextIO

from .errors import TimeUp


@dataclass
class Stop:
    """How a run ended: 'shutdown', 'fault', 'timeout', 'exit-limit', 'interrupted' or 'killed'.

    `status` is what `pvtool run` exits with: the guest's own status after a
    shutdown, 124 after a timeout or the exit limit, 125 after a fault, 130
    when interrupted, 137 when a debugger killed it."""
    kind: str
    status: int
    message: str = ""


class Deadline:
    """The run's host-time limit (--timeout), for loops that might run long inside one exit."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.at = perf_counter() + seconds if seconds else None

    def left(self) -> float | None:
        return None if self.at is None else self.at - perf_counter()

    def check(self) -> None:
        if self.at is not None and perf_counter() >= self.at:
            raise TimeUp()

    def postpone(self, seconds: float) -> None:
        """Time the guest did not run (a debugger held it) does not count."""
        if self.at is not None:
            self.at += seconds


@dataclass(eq=False)
class Vm:
    """One guest and everything that runs it."""
    image: "Image"                 # loader.py: the validated image
    mode: "Mode"                   # modes.py: what differs between bare, trap and pv
    engine: "Engine"               # engine.py: the Unicorn CPU and its raw hooks
    mem: "GuestMemory"             # memory.py: RAM and guest-physical permissions
    mmu: "Mmu"                     # mmu.py: the guest's page tables, validated and pinned
    cpu: "Cpu"                     # cpu.py: registers, control registers, descriptor tables
    clock: "VirtualClock"          # clock.py: virtual time and its timers
    pics: "PicPair"                # devices/pic.py: where interrupts come from
    bus: "IoBus"                   # devices/bus.py: port I/O to the devices
    cpuid: "Cpuid"                 # devices/cpuid.py
    msrs: "MsrFile"                # devices/msr.py
    oneshot: "Timer"               # the pv set_timer timer (IRQ 0)
    console: "Console"             # console.py: what the guest printed
    stats: "Stats"                 # stats.py: exits and times
    patches: "Patches"             # patches.py: instructions made to exit
    trace: TextIO | None = None    # --trace: a line per exit
    run: "Runner" = None           # run.py: the run loop the exits report to (set right after)
    stop: Stop | None = None       # set once, by kill(): the run is over

    def kill(self, stop: Stop) -> None:
        """End the run (the first reason wins) and stop the CPU as soon as it can."""
        if self.stop is None:
            self.stop = stop
        self.engine.uc.emu_stop()

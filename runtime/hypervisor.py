"""The hypervisor: one guest, one vCPU, one run.  `run()` is the entry point.

    run(image_bytes, mode) -> RunResult

`Machine` puts the parts together: RAM (memory.py), the MMU and its
page-table validation (mmu.py), the vCPU and run loop (vcpu.py), the
devices, and the exits of the chosen mode:

- `bare`: a native image on a bare machine.  Privileged instructions act on
  Unicorn's vCPU directly; port I/O and cpuid reach the device model through
  Unicorn instruction hooks.  The baseline.
- `trap`: a native image under trap-and-emulate (trap.py).
- `pv`: a PV image; it reaches the hypervisor only through the hypercall
  page (hypercalls.py).  Port I/O or cpuid run directly are faults.

In every mode the machine has the same devices: a 16550 UART, the debug-exit
port, the two 8259 PICs and the 8254 PIT (its channel 0 on IRQ 0), and the
virtual clock they run on.  It has no local APIC (CPUID leaf 1 says so):
the PICs are wired straight to the CPU, whose interrupts the vCPU delivers
(vcpu.py).  A pv guest also has a one-shot timer (`set_timer`) on IRQ 0.

In every mode the guest sees the same low memory: the start-info page, the
shared page, the boot page tables (an identity map of the first GiB, as far
as RAM reaches, with 2 MiB pages) and the boot GDT.  Images whose kind
does not match the mode are refused.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from time import perf_counter
from typing import Callable, TextIO

from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_MODE_64, Uc
from unicorn import x86_const as U

from pvimage import abi

from . import hypercalls, trap
from .clock import Timer, VirtualClock
from .devices import IoBus
from .devices.cpuid import Cpuid
from .devices.debug_exit import PORT as DEBUG_EXIT_PORT, DebugExit
from .devices.msr import MsrFile
from .devices.pic import PicPair
from .devices.pit import BASE as PIT_BASE, IRQ as TIMER_IRQ, Pit8254
from .devices.uart import COM1, Uart16550
from .errors import GuestFault, ImageError
from .events import PvEvents
from .loader import Image, hypercall_page_bytes, load_image
from .memory import NONE, RX, W, X, GuestMemory
from .mmu import Mmu
from .stats import Stats
from .vcpu import INSN, SYSCALL, Stop, Vcpu

MODES = ("bare", "trap", "pv")
DEFAULT_MEMORY_MIB = abi.DEFAULT_RAM >> 20
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 2, 4096


@dataclass
class RunResult:
    status: int            # what `pvtool run` exits with: the guest's status, 124 or 125
    reason: str            # 'shutdown', 'fault', 'timeout' or 'exit-limit'
    message: str           # one line for stderr; empty after a shutdown
    console: bytes
    stats: Stats


class Console:
    """Guest console output: kept for the result, and passed on to `sink` as it comes."""

    def __init__(self, sink: Callable[[bytes], None] | None):
        self.data = bytearray()
        self.sink = sink

    def write(self, data: bytes) -> None:
        self.data += data
        if self.sink:
            self.sink(data)


def default_mode(image: Image) -> str:
    return "pv" if image.mode == "pv" else "bare"


class Machine:
    def __init__(self, image: Image, mode: str, ram: int, *, cmdline: str = "",
                 console: Callable[[bytes], None] | None = None, trace: TextIO | None = None,
                 max_exits: int | None = None):
        _check_mode(image, mode)
        self.image, self.mode = image, mode
        self.uc = uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.mem = GuestMemory(uc, ram)
        self.mmu = Mmu(uc, self.mem, holes=mode == "trap")
        self.clock = VirtualClock()
        self.published_tsc = 0           # the SH_TIME value last written to the shared page
        self.stats = Stats(mode)
        self.console = Console(console)
        self.pics = PicPair()
        self.vcpu = Vcpu(uc, self.mmu, self.stats, image.describe, self.clock, self.pics, trace, max_exits)
        self.cpuid = Cpuid()
        self.msrs = MsrFile(uc, self.clock)
        self.bus = IoBus()
        self.bus.attach(Uart16550(self.console.write), COM1, 8)
        self.bus.attach(DebugExit(), DEBUG_EXIT_PORT)
        self.pics.attach(self.bus)
        self.pit = Pit8254(self.clock, self.pics.raise_irq)
        self.bus.attach(self.pit, PIT_BASE, 4)
        self.oneshot = self.clock.add(Timer("set_timer", TIMER_IRQ, self._oneshot_expired))
        self._load(cmdline)
        self.vcpu.reset(image.entry)
        self._install()

    # -- set-up -----------------------------------------------------------------------
    def _load(self, cmdline: str) -> None:
        mem, image = self.mem, self.image
        for seg in image.segments:
            mem.set_range(seg.address, seg.end, NONE, "")
        for seg in image.segments:        # segments sharing a page: it gets the union of their permissions
            mem.set_range(seg.address, seg.end, seg.perm, "text" if seg.perm & X else
                          "data" if seg.perm & W else "read-only data", merge=True)
            mem.write(seg.address, seg.data)
        if self.mode != "bare" and any(p & W and p & X for p in mem.perm):
            raise ImageError(f"a text segment shares a page with a writable one; {self.mode} mode "
                             f"needs text that cannot change")
        if image.hypercall_page is not None:
            mem.write(image.hypercall_page, hypercall_page_bytes())
            mem.set_range(image.hypercall_page, image.hypercall_page + abi.PAGE_SIZE, RX, "hypercall page")
        mem.commit()
        mem.write(abi.BOOT_GDT, abi.BOOT_GDT_ENTRIES)
        self._boot_tables()
        mem.write(abi.START_INFO, self._start_info(cmdline))
        mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\x01")
        if self.mode != "bare":
            self.mmu.adopt_root(abi.BOOT_PML4)

    def _boot_tables(self) -> None:
        big = 1 << 21
        count = min(512, (self.mem.size + big - 1) // big)
        self.mem.write_u64(abi.BOOT_PML4, abi.BOOT_PDPT | 3)
        self.mem.write_u64(abi.BOOT_PDPT, abi.BOOT_PD | 3)
        self.mem.write(abi.BOOT_PD, struct.pack(f"<{count}Q", *((k * big) | 0x83 for k in range(count))))

    def _start_info(self, cmdline: str) -> bytes:
        text = cmdline.encode()
        if len(text) >= abi.CMDLINE_MAX:
            raise ImageError(f"command line longer than {abi.CMDLINE_MAX - 1} bytes")
        head = struct.pack("<8Q", abi.START_INFO_MAGIC, abi.ABI_VERSION, self.mem.size, abi.SHARED_PAGE,
                           self.image.hypercall_page or 0, abi.BOOT_PML4, abi.BOOT_STACK_TOP,
                           1 if self.mode == "pv" else 0)
        return head.ljust(abi.SI_CMDLINE, b"\0") + text + b"\0"

    def _install(self) -> None:
        uc, guard = self.uc, self.vcpu.guard
        uc.hook_add(UC_HOOK_INSN, guard(self._on_syscall, SYSCALL), None, 1, 0, U.UC_X86_INS_SYSCALL)
        uc.hook_add(UC_HOOK_INSN, guard(self._on_in, INSN), None, 1, 0, U.UC_X86_INS_IN)
        uc.hook_add(UC_HOOK_INSN, guard(self._on_out, INSN), None, 1, 0, U.UC_X86_INS_OUT)
        uc.hook_add(UC_HOOK_INSN, guard(self._on_cpuid, INSN), None, 1, 0, U.UC_X86_INS_CPUID)
        if self.mode == "bare":           # Unicorn runs hlt itself and stops after it
            self.vcpu.hlt_sites = frozenset(f.address for f in self.image.sensitive if f.mnemonic == "hlt")
        elif self.mode == "trap":
            trap.install(self)
        else:
            self.vcpu.on_write_protect = self._pv_write_protect
            self.vcpu.pv = PvEvents(self.mem, self.image.hypercall_page, self.image.info.sites,
                                    lambda: hypercalls.multicall(self))
            hypercalls.publish(self)

    # -- exits common to the modes -------------------------------------------------------
    def _on_syscall(self) -> None:
        if self.mode != "pv":
            raise GuestFault("syscall in a native image: there is no system-call handler")
        hypercalls.on_syscall(self)

    def _direct(self, what: str) -> None:
        if self.mode == "pv":
            raise GuestFault(f"{what} run directly by a PV guest (hidden from the sweep)")
        self.vcpu.count(what)

    def _on_in(self, port: int, size: int) -> int:
        self._direct("port I/O in")
        return self.bus.read(port, size)

    def _on_out(self, port: int, size: int, value: int) -> None:
        self._direct("port I/O out")
        self.bus.write(port, size, value)

    def _on_cpuid(self) -> int:
        self._direct("cpuid")
        self.cpuid.execute(self.uc)
        return 1                                  # skip Unicorn's own cpuid

    def _oneshot_expired(self, deadline: int) -> None:
        self.pics.raise_irq(TIMER_IRQ)

    def _pv_write_protect(self, pa: int, size: int, value: int) -> bool:
        if self.mmu.release(pa, size, value):
            self.vcpu.count("table page released")
            return True
        table = self.mmu.tables.get(pa & ~(abi.PAGE_SIZE - 1))
        if table is not None:
            raise GuestFault(f"direct write to a live page table at {pa:#x} (level {table}); "
                             f"PV guests update page tables with set_pte")
        return False

    # -- the run ------------------------------------------------------------------------
    def run(self, timeout: float | None) -> RunResult:
        stop: Stop = self.vcpu.run(timeout)
        self.stats.tsc = self.clock.ticks
        return RunResult(stop.status, stop.kind, stop.message, bytes(self.console.data), self.stats)


def _check_mode(image: Image, mode: str) -> None:
    if mode not in MODES:
        raise ImageError(f"unknown mode {mode!r} (bare, trap or pv)")
    if mode == "pv" and image.mode != "pv":
        raise ImageError("native image cannot run in pv mode (it has no PVTool PV note)")
    if mode != "pv" and image.mode == "pv":
        raise ImageError(f"PV image cannot run in {mode} mode: it expects the hypercall page")
    if mode != "bare" and any(s.perm & X and s.perm & W for s in image.segments):
        raise ImageError(f"a segment is both writable and executable; {mode} mode needs text that cannot change")


def run(image: bytes, mode: str | None = None, timeout: float | None = 60.0,
        memory: int = DEFAULT_MEMORY_MIB, *, max_exits: int | None = None, trace: TextIO | None = None,
        console: Callable[[bytes], None] | None = None, cmdline: str = "") -> RunResult:
    """Load and run one guest.  Raises ImageError (one line) when the image or options are refused."""
    start = perf_counter()
    if not MIN_MEMORY_MIB <= memory <= MAX_MEMORY_MIB:
        raise ImageError(f"--memory {memory} MiB is outside {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}")
    loaded = load_image(image, memory << 20)
    vm = Machine(loaded, mode or default_mode(loaded), memory << 20, cmdline=cmdline,
                 console=console, trace=trace, max_exits=max_exits)
    result = vm.run(timeout)
    result.stats.wall_seconds = perf_counter() - start
    return result

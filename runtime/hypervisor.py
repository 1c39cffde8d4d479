"""The hypervisor's front door: set up one guest, run it, report.  `run()` is the entry point.

    run(image_bytes, mode) -> RunResult

`create` puts the machine together (machine.Vm): the image is loaded and
validated (loader.py), RAM and its guest-physical permissions set up
(memory.py), the MMU (mmu.py), the CPU (cpu.py), the devices, and the
mode's object (modes.py); the run loop (run.py) installs the exits and
runs it.

Every mode has the same machine: a 16550 UART, the debug-exit port, the two
8259 PICs and the 8254 PIT (its channel 0 on IRQ 0), and the virtual clock
they run on.  It has no local APIC (CPUID leaf 1 says so): the PICs are
wired straight to the CPU.  A pv guest also has a one-shot timer
(`set_timer`) on IRQ 0.

In every mode the guest sees the same low memory: the start-info page, the
shared page, the boot page tables (an identity map of the first GiB, as far
as RAM reaches, with 2 MiB pages) and the boot GDT.  Images whose kind does
not match the mode are refused.
"""
from __future__ import annotations

import gc
import struct
from dataclasses import dataclass, field
from time import perf_counter
from typing import TYPE_CHECKING, Callable, TextIO

from pvimage import abi

from .clock import Timer, VirtualClock
from .console import Console
from .cpu import Cpu
from .devices.bus import IoBus
from .devices.cpuid import Cpuid
from .devices.debug_exit import PORT as DEBUG_EXIT_PORT, DebugExit
from .devices.marker import PORT as MARKER_PORT, PhaseMarker
from .devices.msr import MsrFile
from .devices.pic import PicPair
from .devices.pit import BASE as PIT_BASE, IRQ as TIMER_IRQ, Pit8254
from .devices.uart import COM1, Uart16550
from .engine import Engine
from .errors import ImageError
from .exits import hypercalls
from .loader import Image, hypercall_page_bytes, load_image
from .machine import Deadline, Vm
from .memory import NONE, RX, W, X, GuestMemory
from .mmu import Mmu
from .modes import MODES, Mode, choose
from .patches import Patches
from .run import Runner
from .stats import Stats

if TYPE_CHECKING:
    from .debugger import Debugger

DEFAULT_MEMORY_MIB = abi.DEFAULT_RAM >> 20
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 2, 4096


@dataclass
class RunResult:
    status: int            # what `pvtool run` exits with: the guest's status, 124, 125 or 130
    reason: str            # 'shutdown', 'fault', 'timeout', 'exit-limit' or 'interrupted'
    message: str           # one line for stderr; empty after a shutdown
    console: bytes         # what the guest printed (the last console.TAIL_MAX bytes of it)
    stats: Stats
    console_bytes: int = 0 # how much it printed, all told
    console_lost: bool = False   # the console sink failed (a closed pipe) and was dropped
    profile: list[tuple[int, str, str]] = field(default_factory=list)   # (exits, reason, where), most first


def create(image: Image, mode: str | None, ram: int, *, cmdline: str = "",
           console: Callable[[bytes], None] | None = None, trace: TextIO | None = None,
           max_exits: int | None = None, timeout: float | None = None, profile: bool = False,
           lenient_batches: bool = False, debugger: Debugger | None = None) -> Vm:
    """Put a guest's machine together, ready to run (under `debugger`, a debugger.Debugger)."""
    chosen = choose(mode, image)
    _check_segments(image, chosen)
    deadline = Deadline(timeout)
    engine = Engine()
    uc = engine.uc
    mem = GuestMemory(uc, ram, hypervisor_owns_tables=chosen.tracks_tables)
    cpu = Cpu(engine)
    clock = VirtualClock()
    pics = PicPair()
    stats = Stats(chosen.name, profile=profile)
    vm = Vm(image=image, mode=chosen, engine=engine, mem=mem,
            mmu=Mmu(uc, mem, set_cr3=cpu.load_cr3, check_time=deadline.check,
                    identity_frames=_text_frames(image) if chosen.name == "pv" else None,
                    flush_page=engine.flush_page),
            cpu=cpu, clock=clock, pics=pics, bus=IoBus(), cpuid=Cpuid(), msrs=MsrFile(engine.regs, clock),
            oneshot=clock.add(Timer("set_timer", TIMER_IRQ, lambda deadline: pics.raise_irq(TIMER_IRQ))),
            console=Console(console), stats=stats, patches=Patches(mem), trace=trace)
    vm.run = Runner(vm, deadline, max_exits=max_exits, trace=trace, lenient_batches=lenient_batches)
    if debugger is not None:
        debugger.attach(vm)                # before install: the exits are chosen with it in mind
    _attach_devices(vm)
    _load(vm, cmdline)
    cpu.reset(image.entry)
    if chosen.watches_control_state:
        cpu.watch_control_state()
    vm.run.install()
    if chosen.name == "pv":
        hypercalls.publish(vm)
    cpu.regs.finish()                  # from here on the API and the hooks see the same registers
    return vm


def _attach_devices(vm: Vm) -> None:
    bus = vm.bus
    bus.attach(Uart16550(vm.console.write), COM1, 8)
    bus.attach(DebugExit(), DEBUG_EXIT_PORT)
    vm.pics.attach(bus)
    bus.attach(Pit8254(vm.clock, vm.pics.raise_irq), PIT_BASE, 4)
    bus.attach(PhaseMarker(vm.stats, vm.clock), MARKER_PORT)


def _load(vm: Vm, cmdline: str) -> None:
    mem, image = vm.mem, vm.image
    for seg in image.segments:
        mem.set_range(seg.address, seg.end, NONE, "")
    for seg in image.segments:        # segments sharing a page: it gets the union of their permissions
        mem.set_range(seg.address, seg.end, seg.perm, "text" if seg.perm & X else
                      "data" if seg.perm & W else "read-only data", merge=True)
        mem.write(seg.address, seg.data)
    if vm.mode.name != "bare" and any(p & W and p & X for p in mem.perm):
        raise ImageError(f"a text segment shares a page with a writable one; {vm.mode.name} mode "
                         f"needs text that cannot change")
    if image.hypercall_page is not None:
        mem.write(image.hypercall_page, hypercall_page_bytes())
        mem.set_range(image.hypercall_page, image.hypercall_page + abi.PAGE_SIZE, RX, "hypercall page")
    mem.commit()
    mem.write(abi.BOOT_GDT, abi.BOOT_GDT_ENTRIES)
    _boot_tables(mem)
    mem.write(abi.START_INFO, _start_info(vm, cmdline))
    mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\x01")
    if vm.mode.tracks_tables:
        vm.mmu.adopt_root(abi.BOOT_PML4)


def _boot_tables(mem: GuestMemory) -> None:
    big = 1 << 21
    count = min(512, (mem.size + big - 1) // big)
    mem.write_u64(abi.BOOT_PML4, abi.BOOT_PDPT | 3)
    mem.write_u64(abi.BOOT_PDPT, abi.BOOT_PD | 3)
    mem.write(abi.BOOT_PD, struct.pack(f"<{count}Q", *((k * big) | 0x83 for k in range(count))))


def _start_info(vm: Vm, cmdline: str) -> bytes:
    text = cmdline.encode("utf-8", errors="surrogateescape")
    if len(text) >= abi.CMDLINE_MAX:
        raise ImageError(f"command line longer than {abi.CMDLINE_MAX - 1} bytes")
    if b"\0" in text:
        raise ImageError("command line contains a NUL byte")
    head = struct.pack("<8Q", abi.START_INFO_MAGIC, abi.ABI_VERSION, vm.mem.size, abi.SHARED_PAGE,
                       vm.image.hypercall_page or 0, abi.BOOT_PML4, abi.BOOT_STACK_TOP,
                       1 if vm.mode.name == "pv" else 0)
    return head.ljust(abi.SI_CMDLINE, b"\0") + text + b"\0"


def _text_frames(image: Image) -> list[tuple[int, int]]:
    """The guest-physical pages of the image's executable segments (rule R9: mapped only where they are)."""
    page = abi.PAGE_SIZE
    return [(s.address & ~(page - 1), (s.end + page - 1) & ~(page - 1)) for s in image.segments if s.perm & X]


def _check_segments(image: Image, mode: Mode) -> None:
    if mode.name != "bare" and any(s.perm & X and s.perm & W for s in image.segments):
        raise ImageError(f"a segment is both writable and executable; {mode.name} mode needs text that cannot change")


def finish(vm: Vm) -> RunResult:
    """Run the guest to its end and collect the result.

    While it runs, every object that exists already (the image, the
    compiler's output, the machine) is kept out of Python's cyclic
    collector: exits allocate, and each collection of the oldest generation
    would walk all of them again (a fifth of a pv run of kernels/lmbench.pvk,
    sampled with py-spy, before this)."""
    gc.freeze()
    try:
        stop = vm.run.run()
    finally:
        gc.unfreeze()
    vm.stats.tsc = vm.clock.ticks
    profile = sorted(((n, reason, vm.image.describe(at)) for reason, sites in vm.stats.sites.items()
                      for at, n in sites.items()), key=lambda row: -row[0])
    return RunResult(stop.status, stop.kind, stop.message, vm.console.tail, vm.stats, vm.console.total,
                     vm.console.sink_error is not None, profile)


def run(image: bytes, mode: str | None = None, timeout: float | None = 60.0,
        memory: int = DEFAULT_MEMORY_MIB, *, max_exits: int | None = None, trace: TextIO | None = None,
        console: Callable[[bytes], None] | None = None, cmdline: str = "", profile: bool = False,
        lenient_batches: bool = False, debugger: Debugger | None = None) -> RunResult:
    """Load and run one guest.  Raises ImageError (one line) when the image or options are refused."""
    start = perf_counter()
    if not MIN_MEMORY_MIB <= memory <= MAX_MEMORY_MIB:
        raise ImageError(f"--memory {memory} MiB is outside {MIN_MEMORY_MIB}..{MAX_MEMORY_MIB}")
    loaded = load_image(image, memory << 20)
    vm = create(loaded, mode, memory << 20, cmdline=cmdline, console=console, trace=trace,
                max_exits=max_exits, timeout=timeout, profile=profile, lenient_batches=lenient_batches,
                debugger=debugger)
    vm.stats.load_seconds = perf_counter() - start
    result = finish(vm)
    result.stats.wall_seconds = perf_counter() - start
    return result

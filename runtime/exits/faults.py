"""Exceptions the guest raised, system calls in native images, and how Unicorn's own stops are reported.

Unicorn does not deliver exceptions through the guest's IDT: it calls the
exception hook.  The runtime acts as the CPU: an exception for which the
guest has a usable gate is delivered to it (delivery.enter: from user
mode on the kernel stack), with its error code (read from Unicorn's saved
context, where it is not a register) and, for a page fault, CR2 in the
shared page too (pv); Unicorn's record of the exception in flight is
cleared, or the next page fault would arrive as a double fault.  An
exception the guest has no gate for ends the run as a fault named after
the vector (#PF with its address), as before a kernel installs handlers.
In trap and pv mode every exception the guest takes is an exit
("exception N": trap-and-emulate's monitor, Xen's bounce), and so is a
system call from user mode; in hvm-shadow a page fault is; elsewhere the
runtime only plays the CPU, which stats.events counts apart.

`syscall` in a native image (bare, trap) is also the runtime's to
perform: Unicorn only calls the hook.  It does what the CPU does: RCX =
the next RIP, R11 = RFLAGS, RFLAGS masked by SFMASK, ring 0 with the ABI's
kernel selectors (STAR), RIP = LSTAR.

The breakpoints the runtime patches in never get here (run.py sends them
to trapped.py first).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import (UC_MEM_FETCH_PROT, UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT, UC_MEM_READ_UNMAPPED,
                     UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED)

from pvimage import abi

from .. import delivery
from ..devices.msr import EFER_SCE, LSTAR, SFMASK
from ..engine import RIP_INDEX
from ..errors import GuestException, GuestFault

if TYPE_CHECKING:
    from ..machine import Vm

SYSCALL_SIZE = 2
RFLAGS_RF = 1 << 16

EXCEPTIONS = {0: "divide error (#DE)", 1: "debug trap (#DB)", 3: "breakpoint (#BP, int3)",
              4: "overflow (#OF)", 5: "bound range exceeded (#BR)", 6: "invalid opcode (#UD)",
              7: "device not available (#NM)", 8: "double fault (#DF)", 10: "invalid TSS (#TS)",
              11: "segment not present (#NP)", 12: "stack-segment fault (#SS)",
              13: "general protection fault (#GP)", 14: "page fault (#PF)",
              16: "x87 floating-point error (#MF)", 17: "alignment check (#AC)",
              18: "machine check (#MC)", 19: "SIMD floating-point error (#XM)"}
_ACCESS = {UC_MEM_READ_UNMAPPED: "read of", UC_MEM_WRITE_UNMAPPED: "write to",
           UC_MEM_FETCH_UNMAPPED: "execution of", UC_MEM_READ_PROT: "read of unreadable",
           UC_MEM_WRITE_PROT: "write to read-only", UC_MEM_FETCH_PROT: "execution of non-executable"}


def on_exception(vm: Vm, vector: int) -> None:
    """Unicorn reports exception `vector` at the current RIP: the guest takes it, or the run ends."""
    regs = vm.cpu.regs
    error = regs.exception_error_code() if vector in delivery.HAS_ERROR_CODE else None
    regs.clear_exception()
    _deliver(vm, vector, error)


def take(vm: Vm, exc: GuestException) -> None:
    """The guest takes exception `exc` at exc.rip (the current RIP if None), if it has a gate for it."""
    if exc.rip is not None:
        vm.cpu.jump(exc.rip)
    _deliver(vm, exc.vector, exc.error_code)


def _deliver(vm: Vm, vector: int, error_code: int | None) -> None:
    try:                                   # read once: whether the kernel handles it, and where
        gate = delivery.read_gate(vm.mmu, vm.cpu.read_table("idt"), vector)
    except delivery.NoGate:
        what = EXCEPTIONS.get(vector, f"software interrupt {vector:#x}")
        if vector == 14:
            what += f" accessing {vm.cpu.read_cr(2):#x}"
        raise GuestFault(what) from None
    except GuestFault:                     # a gate the CPU cannot use: delivery.enter says why
        gate = None
    _exit_or_event(vm, vm.mode.exception_exits_on(vector), f"exception {vector}")
    if vector == 14 and vm.mode.virtual_if:
        vm.mem.write_u64(abi.SHARED_PAGE + abi.SH_CR2, vm.cpu.read_cr(2))
    delivery.enter(vm, vector, "exception", error_code, gate)


def _exit_or_event(vm: Vm, exits: bool, what: str) -> None:
    """An exit in modes where the hypervisor takes it first; else the CPU's own work (stats.events)."""
    if exits:
        vm.run.count(what, vm.cpu.regs.gprs[RIP_INDEX])
    else:
        vm.stats.events[what] += 1


def system_call(vm: Vm) -> None:
    """`syscall` in a native image: what the CPU does (the hook is the only thing Unicorn does)."""
    _exit_or_event(vm, vm.mode.syscall_exits, "syscall")
    cpu = vm.cpu
    if not cpu.regs.efer & EFER_SCE:
        raise GuestException(6)                                 # #UD: system calls are off
    entry, mask = cpu.regs.msr(LSTAR), cpu.regs.msr(SFMASK)
    rflags = cpu.rflags()
    cpu.regs["rcx"] = cpu.rip + SYSCALL_SIZE
    cpu.regs["r11"] = rflags
    cpu.enter_ring(0)
    cpu.set_rflags(rflags & ~mask & ~RFLAGS_RF | 2)
    cpu.jump(entry)


def describe_access(vm: Vm, access: int, address: int, size: int) -> str:
    return f"{_ACCESS.get(access, 'access to')} guest-physical {vm.mem.describe(address)}"

"""Exceptions the guest raised, and how Unicorn's own stops are reported.

Unicorn does not deliver exceptions through the guest's IDT: it calls the
exception hook (or stops with an error).  Today every exception is a
fault that ends the run, named after the vector (#PF with its address).
The breakpoints the runtime patches in never get here (run.py sends them
to trapped.py first).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import (UC_MEM_FETCH_PROT, UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT, UC_MEM_READ_UNMAPPED,
                     UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED)

from ..errors import GuestFault

if TYPE_CHECKING:
    from ..machine import Vm

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
    what = EXCEPTIONS.get(vector, f"software interrupt {vector:#x}")
    if vector == 14:
        what += f" accessing {vm.cpu.read_cr(2):#x}"
    raise GuestFault(what)


def system_call(vm: Vm) -> None:
    raise GuestFault("syscall in a native image: there is no system-call handler")


def describe_access(vm: Vm, access: int, address: int, size: int) -> str:
    return f"{_ACCESS.get(access, 'access to')} guest-physical {vm.mem.describe(address)}"

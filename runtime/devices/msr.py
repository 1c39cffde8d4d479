"""The MSR file: which model-specific registers exist and what writes they take.

Registers the CPU itself uses (EFER, FS/GS base, the kernel GS base) live in
Unicorn's vCPU and are written through, after checks that keep the
hypervisor's invariants (long mode stays on; bases stay canonical).  So do
the system-call MSRs (STAR, LSTAR, CSTAR, SFMASK): Unicorn's own `sysretq`
reads them, and the runtime reads them when it performs a `syscall`
(faults.py, hypercalls.py); STAR must name the ABI's selectors.  The rest
are plain storage.  An unknown MSR, or a
write the file refuses, raises `Refused(EINVAL)`: `-EINVAL` from the
hypercall, #GP (a fault) when trapped.  `bare` mode does not come here:
Unicorn cannot hook rdmsr/wrmsr, so a bare guest reads Unicorn's own MSRs.
"""
from __future__ import annotations

from pvimage import abi

from ..clock import VirtualClock
from ..engine import RegisterFile
from ..errors import Refused

IA32_TSC = 0x10
IA32_APIC_BASE = 0x1B
IA32_MISC_ENABLE = 0x1A0
IA32_PAT = 0x277
EFER = 0xC0000080
STAR, LSTAR, CSTAR, SFMASK = 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084
FS_BASE, GS_BASE, KERNEL_GS_BASE = 0xC0000100, 0xC0000101, 0xC0000102
TSC_AUX = 0xC0000103

EFER_SCE, EFER_LME, EFER_LMA, EFER_NXE = 1 << 0, 1 << 8, 1 << 10, 1 << 11
_EFER_FIXED = EFER_LME | EFER_LMA           # long mode cannot be left
_EFER_WRITABLE = EFER_SCE | EFER_NXE | _EFER_FIXED
_IN_CPU = (EFER, FS_BASE, GS_BASE, KERNEL_GS_BASE, STAR, LSTAR, CSTAR, SFMASK)
_STORED = {IA32_PAT: 0x0007040600070406, IA32_MISC_ENABLE: 1, IA32_APIC_BASE: 0, TSC_AUX: 0}
_READ_ONLY = (IA32_MISC_ENABLE, IA32_APIC_BASE)


CANONICAL_TOPS = (0, (1 << 17) - 1)       # bits 63-47 of a canonical address: all 0 or all 1


def canonical(va: int) -> bool:
    return va >> 47 in CANONICAL_TOPS


class MsrFile:
    def __init__(self, regs: RegisterFile, clock: VirtualClock):
        self.regs = regs              # through the register file, so its copy never overwrites a write
        self.clock = clock
        self.stored = dict(_STORED)

    def read(self, msr: int) -> int:
        if msr in _IN_CPU:
            return self.regs.msr(msr)
        if msr == IA32_TSC:
            return self.clock.read_tsc()
        if msr in self.stored:
            return self.stored[msr]
        raise Refused(abi.EINVAL, f"rdmsr of unknown MSR {msr:#x}")

    def write(self, msr: int, value: int) -> None:
        value &= (1 << 64) - 1
        if msr == EFER:
            if value & ~_EFER_WRITABLE or value & _EFER_FIXED != _EFER_FIXED:
                raise Refused(abi.EINVAL, f"EFER value {value:#x} would leave long mode or sets reserved bits")
            self.regs.set_msr(msr, value)
        elif msr in (FS_BASE, GS_BASE, KERNEL_GS_BASE, LSTAR, CSTAR):
            if not canonical(value):
                raise Refused(abi.EINVAL, f"non-canonical address {value:#x} for MSR {msr:#x}")
            self.regs.set_msr(msr, value)
        elif msr == STAR:
            if value and (value >> 32 & 0xFFFF != abi.KERNEL_CS or (value >> 48) + 16 | 3 != abi.USER_CS):
                raise Refused(abi.EINVAL, f"STAR {value:#x}: the selectors must be the ABI's "
                                          f"(kernel {abi.KERNEL_CS:#x}, user {abi.USER_CS:#x})")
            self.regs.set_msr(msr, value)
        elif msr == SFMASK:
            self.regs.set_msr(msr, value & 0xFFFFFFFF)
        elif msr in self.stored and msr not in _READ_ONLY:
            self.stored[msr] = value
        else:
            raise Refused(abi.EINVAL, f"wrmsr to {'read-only' if msr in _READ_ONLY else 'unknown'} MSR {msr:#x}")

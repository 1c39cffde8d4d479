"""The virtual CPUID: what the guest learns about its CPU and hypervisor.

Leaf 0 names a printable vendor; leaf 1 reports the features the vCPU
really has (Unicorn's x86-64) plus the "hypervisor present" bit, and no
local APIC: the runtime's machine wires the PIC straight to the CPU; leaf
0x40000000 names this hypervisor, as KVM ("KVMKVMKVM") and Xen do, and
0x40000001 gives the PV ABI version.  Leaves we do not define read as
zeros.  Every mode uses this table (bare through Unicorn's cpuid hook).
"""
from __future__ import annotations

import struct

from unicorn import Uc
from unicorn import x86_const as U

from pvimage import abi

VENDOR = b"PVToolVCPU64"        # 12 printable bytes: ebx, edx, ecx order
HYPERVISOR = b"PVToolHV\0\0\0\0"  # ebx, ecx, edx order
MAX_BASIC = 1
MAX_HYPERVISOR = 0x40000001
MAX_EXTENDED = 0x80000001

# leaf 1: family 6; edx FPU TSC MSR PAE CX8 PGE CMOV PAT FXSR SSE SSE2.  Not APIC (bit 9): the
# machine has no local APIC, its PICs are wired straight to the CPU (so kernels skip the LAPIC).
LEAF1_EAX = 0x000006F1
LEAF1_EDX = (1 << 0) | (1 << 4) | (1 << 5) | (1 << 6) | (1 << 8) | (1 << 13) | (1 << 15) \
    | (1 << 16) | (1 << 24) | (1 << 25) | (1 << 26)
LEAF1_ECX = (1 << 0) | (1 << 31)          # SSE3, hypervisor present
EXT1_EDX = (1 << 11) | (1 << 20) | (1 << 29)   # SYSCALL, NX, long mode


def _regs(name: bytes, order: str) -> dict[str, int]:
    words = struct.unpack("<3I", name)
    return dict(zip(order, words))


class Cpuid:
    def query(self, leaf: int, subleaf: int = 0) -> tuple[int, int, int, int]:
        """(eax, ebx, ecx, edx) for `leaf`."""
        leaf &= 0xFFFFFFFF
        if leaf == 0:
            r = _regs(VENDOR, "bdc")
            return MAX_BASIC, r["b"], r["c"], r["d"]
        if leaf == 1:
            return LEAF1_EAX, 0, LEAF1_ECX, LEAF1_EDX
        if leaf == 0x40000000:
            r = _regs(HYPERVISOR, "bcd")
            return MAX_HYPERVISOR, r["b"], r["c"], r["d"]
        if leaf == 0x40000001:
            return abi.ABI_VERSION, 0, 0, 0
        if leaf == 0x80000000:
            return MAX_EXTENDED, 0, 0, 0
        if leaf == 0x80000001:
            return 0, 0, 1, EXT1_EDX
        return 0, 0, 0, 0

    def execute(self, uc: Uc) -> None:
        """The cpuid instruction on the vCPU: leaf in eax, subleaf in ecx, results in rax..rdx."""
        regs = self.query(uc.reg_read(U.UC_X86_REG_EAX), uc.reg_read(U.UC_X86_REG_ECX))
        for reg, value in zip((U.UC_X86_REG_RAX, U.UC_X86_REG_RBX, U.UC_X86_REG_RCX, U.UC_X86_REG_RDX), regs):
            uc.reg_write(reg, value)

"""The machine operations of the PVK language: one table, shared by every stage.

The checker takes the signatures from here, the back end the native
instruction, the paravirtualization pass and the `.pv.sites` table the
operation numbers.  Types are written as PVK type strings.
"""
from __future__ import annotations

from dataclasses import dataclass

from pvimage import abi


@dataclass(frozen=True)
class Intrinsic:
    name: str
    params: tuple[str, ...]
    result: str | None
    native: str          # the x86-64 instruction(s) of a native build
    sensitive: bool      # must be rewritten for a PV build


_TABLE = [
    Intrinsic("cli", (), None, "cli", True),
    Intrinsic("sti", (), None, "sti", True),
    Intrinsic("hlt", (), None, "hlt", True),
    Intrinsic("save_flags", (), "u64", "pushfq; pop", True),
    Intrinsic("restore_flags", ("u64",), None, "push; popfq", True),
    Intrinsic("outb", ("u16", "u8"), None, "out dx, al", True),
    Intrinsic("outw", ("u16", "u16"), None, "out dx, ax", True),
    Intrinsic("outl", ("u16", "u32"), None, "out dx, eax", True),
    Intrinsic("inb", ("u16",), "u8", "in al, dx", True),
    Intrinsic("inw", ("u16",), "u16", "in ax, dx", True),
    Intrinsic("inl", ("u16",), "u32", "in eax, dx", True),
    Intrinsic("read_cr0", (), "u64", "mov r, cr0", True),
    Intrinsic("read_cr2", (), "u64", "mov r, cr2", True),
    Intrinsic("read_cr3", (), "u64", "mov r, cr3", True),
    Intrinsic("read_cr4", (), "u64", "mov r, cr4", True),
    Intrinsic("write_cr0", ("u64",), None, "mov cr0, r", True),
    Intrinsic("write_cr3", ("u64",), None, "mov cr3, r", True),
    Intrinsic("write_cr4", ("u64",), None, "mov cr4, r", True),
    Intrinsic("invlpg", ("u64",), None, "invlpg [r]", True),
    Intrinsic("set_pte", ("*u64", "u64"), None, "mov [r], r", True),
    Intrinsic("lgdt", ("*u8",), None, "lgdt [r]", True),
    Intrinsic("lidt", ("*u8",), None, "lidt [r]", True),
    Intrinsic("sgdt", ("*u8",), None, "sgdt [r]", True),
    Intrinsic("sidt", ("*u8",), None, "sidt [r]", True),
    Intrinsic("rdmsr", ("u32",), "u64", "rdmsr", True),
    Intrinsic("wrmsr", ("u32", "u64"), None, "wrmsr", True),
    Intrinsic("cpuid", ("u32", "*u32"), None, "cpuid", True),
    Intrinsic("rdtsc", (), "u64", "rdtsc", True),
    Intrinsic("wbinvd", (), None, "wbinvd", True),
    Intrinsic("pause", (), None, "pause", False),
    # Save rbp, rbx, r12-r15 and rsp to *old, load rsp = new, restore the
    # callee-saved registers found there and return on the new stack.
    Intrinsic("swtch", ("*u64", "u64"), None, "push/pop callee-saved; mov rsp", False),
    # User mode (docs/language.md 7): a system call from user code (rax = nr, rdi, rsi, rdx;
    # the result in rax; rcx and r11 clobbered), the kernel stack for the next entry from
    # user mode (TSS.rsp0 and the syscall entry's stack), the task register, and leaving
    # the kernel to the context a TrapFrame holds.
    Intrinsic("syscall", ("u64", "u64", "u64", "u64"), "u64", "syscall", False),
    Intrinsic("set_kernel_stack", ("*u8", "u64"), None, "mov [tss+4], top; mov [__kernel_stack], top", True),
    Intrinsic("load_tr", ("u16",), None, "ltr r16", True),
    Intrinsic("enter_user", ("*TrapFrame",), None, "mov rsp, frame; pop 15 registers; add rsp, 8; iretq", True),
]

INTRINSICS: dict[str, Intrinsic] = {i.name: i for i in _TABLE}

# Operations that are sensitive but not intrinsics: the return of an
# `interrupt fn` is `iretq` natively and a hypercall in a PV build.
EXTRA_OPS = ("iret",)

# The `.pv.sites` numbers are the ABI's (pvimage.abi.SITE_OPS); every operation has one.
OP_NUMBERS: dict[str, int] = {name: abi.OP_NUMBERS[name] for name in [i.name for i in _TABLE] + list(EXTRA_OPS)}
OP_NAMES: dict[int, str] = {n: name for name, n in OP_NUMBERS.items()}

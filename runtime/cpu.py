"""The virtual CPU's architectural state, and the rules for changing it.

Registers come from the engine's register file (one context copy per
exit).  Besides them this module owns:

- the boot state (docs/abi.md section 3);
- the rules for privileged state that the pv hypercalls and trap mode's
  emulation both apply: control registers and descriptor tables;
- where the guest goes on when an exit returns (`jump`), which depends on
  the kind of hook running;
- the hypervisor's record of the control state it set, checked at every
  exit in pv and trap mode (`check_control_state`): defence in depth
  behind the validator.
"""
from __future__ import annotations

import struct

from unicorn import x86_const as U

from pvimage import abi

from .devices.msr import EFER, EFER_LMA, EFER_LME, EFER_NXE, canonical
from .engine import HF_CPL_MASK, HF_INHIBIT_IRQ, RIP_INDEX, Engine
from .errors import GuestFault, Refused

RFLAGS_IF = 1 << 9
RFLAGS_TF = 1 << 8
RFLAGS_BOOT = 0x2
CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR0_BOOT = CR0_PG | CR0_WP | 0x33               # PE MP ET NE WP PG
CR0_ALLOWED = 0xE005003F                        # PE MP EM TS ET NE WP AM NW CD PG
CR4_PAE = 1 << 5
CR4_ALLOWED = sum(1 << b for b in (3, 4, 5, 6, 7, 8, 9, 10, 16, 18))   # DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT FSGSBASE OSXSAVE
EFER_BOOT = EFER_LME | EFER_LMA | EFER_NXE
CR3_ADDRESS = 0x000F_FFFF_FFFF_F000

CONTROL = {0: U.UC_X86_REG_CR0, 2: U.UC_X86_REG_CR2, 3: U.UC_X86_REG_CR3, 4: U.UC_X86_REG_CR4}
TABLE_REG = {"gdt": U.UC_X86_REG_GDTR, "idt": U.UC_X86_REG_IDTR}
TABLE_MAX_LIMIT = {"gdt": 0xFFFF, "idt": 0xFFF}
DESCRIPTOR = struct.Struct("<HQ")   # what lgdt/lidt read and sgdt/sidt store: u16 limit, u64 base
_BOOT_ZERO = ("rax", "rbx", "rcx", "rdx", "rdi", "rbp", "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")

# What is running the hypervisor's code: decides how the guest is redirected (`jump`).
LOOP, CODE, SYSCALL, INSN, TRAP, FAULT = "run loop", "code", "syscall", "instruction", "trap", "fault"
SYSCALL_SIZE = 2


class Cpu:
    def __init__(self, engine: Engine):
        self.uc = engine.uc
        self.regs = engine.regs
        self.gate = engine.gate
        self.exit_kind = LOOP
        # CR0, CR3, CR4, EFER as the hypervisor last set them (pv and trap check them at every exit).
        self.expected: tuple[int, int, int, int] | None = None

    # -- boot ----------------------------------------------------------------------------
    def reset(self, entry: int) -> None:
        uc = self.uc
        uc.reg_write(U.UC_X86_REG_CR3, abi.BOOT_PML4)
        uc.reg_write(U.UC_X86_REG_CR4, uc.reg_read(U.UC_X86_REG_CR4) | CR4_PAE)
        uc.msr_write(EFER, EFER_BOOT)
        uc.reg_write(U.UC_X86_REG_CR0, CR0_BOOT)
        uc.reg_write(U.UC_X86_REG_GDTR, (0, abi.BOOT_GDT, abi.BOOT_GDT_LIMIT, 0))
        uc.reg_write(U.UC_X86_REG_IDTR, (0, 0, 0, 0))
        uc.reg_write(U.UC_X86_REG_CS, abi.KERNEL_CS)
        for seg in (U.UC_X86_REG_SS, U.UC_X86_REG_DS, U.UC_X86_REG_ES, U.UC_X86_REG_FS, U.UC_X86_REG_GS):
            uc.reg_write(seg, abi.KERNEL_DS)
        for name in _BOOT_ZERO:
            uc.reg_write(getattr(U, f"UC_X86_REG_{name.upper()}"), 0)
        uc.reg_write(U.UC_X86_REG_RSP, abi.BOOT_STACK_TOP)
        uc.reg_write(U.UC_X86_REG_RSI, abi.START_INFO)
        uc.reg_write(U.UC_X86_REG_RFLAGS, RFLAGS_BOOT)
        uc.reg_write(U.UC_X86_REG_RIP, entry)
        self.regs.invalidate()

    # -- registers -----------------------------------------------------------------------
    @property
    def rip(self) -> int:
        return self.regs.rip

    def resume_rip(self) -> int:
        """Where the guest goes on when the current exit returns."""
        rip = self.regs.rip
        return rip + SYSCALL_SIZE if self.exit_kind == SYSCALL else rip

    def jump(self, rip: int) -> None:
        """Make the guest go on at `rip` when the current exit returns.

        Measured (tests/test_runtime_unicorn.py): a RIP written in an exception
        hook is where execution goes on; one written in the syscall hook gets
        the syscall's length added after the hook; an in/out/cpuid hook's or a
        memory hook's is ignored, so those stop emulation and let the run loop
        act."""
        if self.exit_kind in (INSN, FAULT):
            raise RuntimeError(f"internal error: cannot redirect the guest from a {self.exit_kind} hook")
        # the raw field: every redirection happens inside an exit or the loop's `safely`
        self.regs.gprs[RIP_INDEX] = rip - SYSCALL_SIZE if self.exit_kind == SYSCALL else rip

    @property
    def interrupt_flag(self) -> bool:
        return bool(self.regs.eflags & RFLAGS_IF)

    def set_interrupt_flag(self, on: bool) -> None:
        self.regs.set_eflags_bit(RFLAGS_IF, on)

    @property
    def in_interrupt_shadow(self) -> bool:
        """The instruction after sti (or a load of SS): no interrupt may arrive before it."""
        return bool(self.regs.hflags & HF_INHIBIT_IRQ)

    @property
    def cpl(self) -> int:
        return self.regs.hflags & HF_CPL_MASK

    def enter_ring(self, ring: int) -> None:
        """What the CPU does to CS, SS and its privilege level when it changes rings (0 or 3)."""
        self.regs.enter_ring(ring)

    def rflags(self) -> int:
        """All of RFLAGS (the arithmetic flags too, which only the API computes)."""
        return self.regs.api_read(U.UC_X86_REG_RFLAGS)

    def set_rflags(self, value: int) -> None:
        self.regs.api_write(U.UC_X86_REG_RFLAGS, value)

    def segment(self, reg: int) -> int:
        """A segment selector (CS and SS from the state itself: they change at every ring switch)."""
        if reg == U.UC_X86_REG_CS:
            return self.regs.selector("cs")
        if reg == U.UC_X86_REG_SS:
            return self.regs.selector("ss")
        return self.regs.api_read(reg) & 0xFFFF

    # -- control registers -----------------------------------------------------------------
    def read_cr(self, n: int) -> int:
        if n not in CONTROL:
            raise Refused(abi.EINVAL, f"no control register CR{n}")
        return self.regs.cr(n)

    def write_cr(self, n: int, value: int) -> None:
        """CR0/CR4 writes: paging and PAE stay on, unsupported bits are refused (CR3 goes to the MMU)."""
        if n == 0:
            if value & ~CR0_ALLOWED:
                raise Refused(abi.EINVAL, f"CR0 value {value:#x} sets unsupported bits")
            if value & (CR0_PE | CR0_PG) != CR0_PE | CR0_PG:
                raise Refused(abi.EINVAL, f"CR0 value {value:#x} turns off protection or paging")
        elif n == 4:
            if value & ~CR4_ALLOWED:
                raise Refused(abi.EINVAL, f"CR4 value {value:#x} sets unsupported bits")
            if not value & CR4_PAE:
                raise Refused(abi.EINVAL, f"CR4 value {value:#x} turns off PAE")
        elif n == 2:
            value &= (1 << 64) - 1
        else:
            raise Refused(abi.EINVAL, f"CR{n} cannot be written this way")
        self.regs.store()
        self.uc.reg_write(CONTROL[n], value)       # through the API: QEMU recomputes its mode flags
        self.regs.invalidate()
        self.remember_control_state()

    def load_cr3(self, cr3: int) -> None:
        """The MMU's half of a CR3 load, once it has validated the root."""
        self.regs.api_write(U.UC_X86_REG_CR3, cr3)     # one ctypes call: the binding's costs several
        self.remember_control_state()

    # -- descriptor tables ------------------------------------------------------------------
    def read_table(self, which: str) -> tuple[int, int]:
        """(limit, base) of the GDT or IDT register."""
        return self.regs.table(TABLE_REG[which])

    def load_table(self, which: str, limit: int, base: int, readable) -> None:
        """lgdt/lidt: the table must be canonical and, all of it, readable by the guest
        (`readable(base, size)` raises Refused otherwise)."""
        if limit > TABLE_MAX_LIMIT[which]:
            raise Refused(abi.EINVAL, f"{which.upper()} limit {limit:#x} is too large")
        if not canonical(base):
            raise Refused(abi.EINVAL, f"{which.upper()} base {base:#x} is not canonical")
        readable(base, limit + 1)
        self.regs.store()
        self.uc.reg_write(TABLE_REG[which], (0, base, limit, 0))
        self.regs.invalidate()

    # -- defence in depth ----------------------------------------------------------------------
    def remember_control_state(self) -> None:
        """Record CR0, CR3, CR4 and EFER as the hypervisor has just set them."""
        if self.expected is not None:
            self.expected = self.regs.control()
            self.gate.expect(self.expected)

    def watch_control_state(self) -> None:
        """Check the control state at every exit from now on: in the exit gate where it can read
        the live CPU state (`natively_checked`), else in the Python hook."""
        self.expected = self.regs.control()
        self.gate.expect(self.expected)
        if self.regs.control_addresses is not None:
            self.gate.watch(self.regs.control_addresses)

    @property
    def natively_checked(self) -> bool:
        return bool(self.gate.state.check)

    def check_control_state(self) -> None:
        """At an exit: CR0, CR3, CR4 and EFER must still hold what the hypervisor set.

        Only the hypervisor changes them in pv and trap mode; a difference
        means an instruction ran that the validator (or trap mode's sweep)
        did not see."""
        now = self.regs.control()
        if now != self.expected:
            for name, was, value in zip(("CR0", "CR3", "CR4", "EFER"), self.expected, now):
                if was != value:
                    raise GuestFault(f"{name} changed behind the hypervisor's back ({was:#x} -> {value:#x}): "
                                     f"a sensitive instruction ran unchecked")

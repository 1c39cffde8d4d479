"""The virtual CPU: Unicorn's x86-64 set up per the boot contract, and the run loop.

Boot state (docs/abi.md section 3): 64-bit long mode, paging on with
CR3 = BOOT_PML4, GDT at BOOT_GDT with CS = 0x08 and data 0x10, interrupts
off, rsp = BOOT_STACK_TOP, rsi = START_INFO, every other register zero.

The run loop calls `uc.emu_start` until the run ends.  Guest code runs
inside Unicorn; every exit (a hook) runs a handler wrapped by `guard`,
which accounts the exit and turns what the handler raises (`Shutdown`,
`GuestFault`, `ExitLimit`, even a hypervisor bug) into the end of the run,
so nothing the guest does can take the hypervisor down.

Interrupts (the PIC's, raised by the PIT or the pv one-shot timer on the
virtual clock) reach the guest in one place, `deliver_events`: after every
exit, at every re-entry of the run loop, and so after every `hlt`/`block`.
It delivers only while the guest's IF is set (RFLAGS.IF in bare and trap,
the shared page's upcall mask clear in pv), through the guest's IDT, on a
hardware interrupt frame (interrupts.py).  Where it runs decides how it
redirects the guest (`jump`): in trap's code hooks and pv's syscall hook it
acts at once; bare's in/out/cpuid hooks cannot redirect the guest, so they
stop emulation and the run loop delivers.

While a timer is armed or an interrupt waits, the guest runs in slices of
SLICE_INSNS instructions (Unicorn's instruction count), so one that
computes or spins without exits still sees time pass and takes its
interrupts; otherwise emu_start runs unbounded but for the run's timeout.
Slices are counted, not timed: stopping Unicorn 2.1.4 from another thread
(emu_stop, or emu_start's own timeout) sometimes resumes it one
instruction early, running a read-modify-write of memory twice (measured:
tests/test_runtime_interrupts.py), so the only asynchronous stop left is
the one that ends a run at its timeout.  Counting costs guest code about
4.5 times its speed while slicing; it is off whenever no timer is armed.

Also here: the rules for the privileged CPU state both pv (hypercalls) and
trap (emulated instructions) change, so the two modes apply one policy:
control registers and descriptor tables.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from time import perf_counter
from typing import Callable, TextIO

from unicorn import (UC_ERR_INSN_INVALID, UC_HOOK_INTR, UC_HOOK_MEM_INVALID, UC_MEM_FETCH_PROT, UC_MEM_FETCH_UNMAPPED, UC_MEM_READ_PROT,
                     UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_PROT, UC_MEM_WRITE_UNMAPPED, Uc, UcError)
from unicorn import x86_const as U

from pvimage import abi

from . import interrupts
from .clock import EXIT_NS, NEVER, SLICE_INSNS, SLICE_NS, VirtualClock
from .devices.msr import EFER, EFER_LMA, EFER_LME, EFER_NXE, canonical
from .devices.pic import PicPair
from .errors import ExitLimit, GuestFault, Refused, Shutdown
from .events import PvEvents
from .mmu import Mmu
from .stats import Stats

END = (1 << 64) - 1                 # emu_start's `until`: never reached (non-canonical)
# What is running the hypervisor's code: the run loop, or a hook of one kind (see Vcpu.jump)
LOOP, CODE, SYSCALL, INSN, OTHER = "run loop", "code", "syscall", "instruction", "fault"
SYSCALL_SIZE = 2
RFLAGS_IF = 1 << 9
RFLAGS_BOOT = 0x2

CR0_PE, CR0_WP, CR0_PG = 1 << 0, 1 << 16, 1 << 31
CR0_BOOT = CR0_PG | CR0_WP | 0x33               # PE MP ET NE WP PG
CR0_ALLOWED = 0xE005003F                        # PE MP EM TS ET NE WP AM NW CD PG
CR4_PAE = 1 << 5
CR4_ALLOWED = sum(1 << b for b in (3, 4, 5, 6, 7, 8, 9, 10, 16, 18))   # DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT FSGSBASE OSXSAVE
EFER_BOOT = EFER_LME | EFER_LMA | EFER_NXE

CONTROL = {0: U.UC_X86_REG_CR0, 2: U.UC_X86_REG_CR2, 3: U.UC_X86_REG_CR3, 4: U.UC_X86_REG_CR4}
TABLE_REG = {"gdt": U.UC_X86_REG_GDTR, "idt": U.UC_X86_REG_IDTR}
TABLE_MAX_LIMIT = {"gdt": 0xFFFF, "idt": 0xFFF}
_GPRS = [U.UC_X86_REG_RAX, U.UC_X86_REG_RBX, U.UC_X86_REG_RCX, U.UC_X86_REG_RDX, U.UC_X86_REG_RDI,
         U.UC_X86_REG_RBP, U.UC_X86_REG_R8, U.UC_X86_REG_R9, U.UC_X86_REG_R10, U.UC_X86_REG_R11,
         U.UC_X86_REG_R12, U.UC_X86_REG_R13, U.UC_X86_REG_R14, U.UC_X86_REG_R15]

EXCEPTIONS = {0: "divide error (#DE)", 1: "debug trap (#DB)", 3: "breakpoint (#BP, int3)",
              4: "overflow (#OF)", 5: "bound range exceeded (#BR)", 6: "invalid opcode (#UD)",
              7: "device not available (#NM)", 8: "double fault (#DF)", 10: "invalid TSS (#TS)",
              11: "segment not present (#NP)", 12: "stack-segment fault (#SS)",
              13: "general protection fault (#GP)", 14: "page fault (#PF)",
              16: "x87 floating-point error (#MF)", 17: "alignment check (#AC)",
              18: "machine check (#MC)", 19: "SIMD floating-point error (#XM)"}
DESCRIPTOR = struct.Struct("<HQ")   # what lgdt/lidt read and sgdt/sidt store: u16 limit, u64 base
_ACCESS = {UC_MEM_READ_UNMAPPED: "read of", UC_MEM_WRITE_UNMAPPED: "write to",
           UC_MEM_FETCH_UNMAPPED: "execution of", UC_MEM_READ_PROT: "read of unreadable",
           UC_MEM_WRITE_PROT: "write to read-only", UC_MEM_FETCH_PROT: "execution of non-executable"}


@dataclass
class Stop:
    """How a run ended: 'shutdown', 'fault', 'timeout' or 'exit-limit'; `status` is pvtool run's."""
    kind: str
    status: int
    message: str = ""


def _timed_out(timeout: float) -> Stop:
    return Stop("timeout", 124, f"timeout: guest still running after {timeout:g} s")


class Vcpu:
    def __init__(self, uc: Uc, mmu: Mmu, stats: Stats, describe: Callable[[int], str],
                 clock: VirtualClock, pic: PicPair, trace: TextIO | None = None,
                 max_exits: int | None = None):
        self.uc = uc
        self.mmu = mmu
        self.stats = stats
        self.describe = describe          # guest address -> "0x.. fn+0x.. (file:line)"
        self.clock = clock
        self.pic = pic
        self.trace = trace
        self.max_exits = max_exits
        self.stop: Stop | None = None
        self.bad_access: tuple[int, int, int] | None = None   # (access, guest-physical, size)
        # pv/trap: a store hit a read-only page; returns True when it handled the store
        self.on_write_protect: Callable[[int, int, int], bool] | None = None
        self.pv: PvEvents | None = None   # pv mode: the virtual IF lives in the shared page
        self.hlt_sites: frozenset[int] = frozenset()   # bare: where the image's hlt instructions are
        self.exit_kind: str = LOOP        # which hook (if any) is running: how RIP can be changed
        self._loop_wanted = False         # a hook stopped emulation to let the run loop act
        self._sliced = False              # the current emu_start is bounded by an instruction count
        self._exits_before = 0            # total exits when it began
        uc.hook_add(UC_HOOK_INTR, self.guard(self._on_interrupt))
        uc.hook_add(UC_HOOK_MEM_INVALID, self.guard(self._on_invalid_access))

    # -- boot -------------------------------------------------------------------------
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
        for reg in _GPRS:
            uc.reg_write(reg, 0)
        uc.reg_write(U.UC_X86_REG_RSP, abi.BOOT_STACK_TOP)
        uc.reg_write(U.UC_X86_REG_RSI, abi.START_INFO)
        uc.reg_write(U.UC_X86_REG_RFLAGS, RFLAGS_BOOT)
        uc.reg_write(U.UC_X86_REG_RIP, entry)

    # -- exits --------------------------------------------------------------------------
    def count(self, reason: str, where: Callable[[], int | None] | None = None) -> None:
        """Account one exit; every exit handler calls this first (`where`: the guest address to trace).

        An exit costs the guest EXIT_NS of virtual time (clock.py)."""
        self.clock.advance(EXIT_NS)
        self._account(reason, where)

    def _account(self, reason: str, where: Callable[[], int | None] | None = None) -> None:
        self.stats.exits[reason] += 1
        self.stats.total_exits += 1
        if self.trace:
            at = where() if where else None
            print(f"exit {self.stats.total_exits}: {reason} at {self.describe(self.rip if at is None else at)}",
                  file=self.trace)
        if self.max_exits is not None and self.stats.total_exits > self.max_exits:
            raise ExitLimit()

    def guard(self, handler: Callable, exit: str = OTHER) -> Callable:
        """Wrap a Unicorn hook: time it, and end the run on whatever it raises.

        `exit` says what kind of hook it is (CODE, SYSCALL, INSN: an exit, after
        which pending events are checked; OTHER: a fault hook; LOOP: not a hook)."""
        def hook(uc, *args):
            start = perf_counter()
            self.exit_kind = exit
            try:
                result = handler(*args[:-1])     # Unicorn's trailing user-data argument is unused
                if exit in (CODE, SYSCALL, INSN) and self.stop is None:
                    self._after_exit()
                return result
            except Shutdown as e:
                self.end(Stop("shutdown", e.status))
            except GuestFault as e:
                self.end(self.fault(e))
            except ExitLimit:
                self.end(Stop("exit-limit", 124, f"stopped after {self.max_exits} exits (--max-exits)"))
            except Exception as e:   # a hypervisor bug must not crash the host either
                self.end(Stop("fault", 125, f"hypervisor error while handling an exit at "
                                            f"{self.describe(self.rip)}: {type(e).__name__}: {e}"))
            finally:
                self.exit_kind = LOOP
                self.stats.hypervisor_seconds += perf_counter() - start
            return False
        return hook

    def end(self, stop: Stop) -> None:
        if self.stop is None:
            self.stop = stop
        self.uc.emu_stop()

    def fault(self, e: GuestFault) -> Stop:
        rip = self.rip if e.rip is None else e.rip
        return Stop("fault", 125, f"guest fault: {e.what} at {self.describe(rip)}")

    @property
    def rip(self) -> int:
        return self.uc.reg_read(U.UC_X86_REG_RIP)

    def resume_rip(self) -> int:
        """Where the guest goes on when the current exit returns."""
        rip = self.uc.reg_read(U.UC_X86_REG_RIP)
        return rip + SYSCALL_SIZE if self.exit_kind == SYSCALL else rip

    def jump(self, rip: int) -> None:
        """Make the guest go on at `rip` when the current exit returns.

        Measured (tests/test_runtime_interrupts.py): a code hook's RIP write is
        where execution goes on; a syscall hook's gets the syscall's length
        added after the hook; an in/out/cpuid hook's is ignored, so those
        stop emulation instead and let the run loop act."""
        if self.exit_kind in (INSN, OTHER):
            raise RuntimeError(f"cannot redirect the guest from a {self.exit_kind} hook")
        self.uc.reg_write(U.UC_X86_REG_RIP, rip - SYSCALL_SIZE if self.exit_kind == SYSCALL else rip)

    def _want_loop(self) -> None:
        self._loop_wanted = True
        self.uc.emu_stop()

    def _after_exit(self) -> None:
        """After every exit: deliver what is pending, or get the run loop to; start slicing if needed."""
        if self.exit_kind != INSN:
            self.deliver_events()
        elif self._can_take():
            self._want_loop()
        if not self._sliced and self._needs_slices():
            self._want_loop()

    # -- the run loop --------------------------------------------------------------------
    def run(self, timeout: float | None) -> Stop:
        deadline = perf_counter() + timeout if timeout else None
        while self.stop is None:
            self._safely(self.deliver_events)
            if self.stop is None:
                self._enter_guest(deadline, timeout)
        return self.stop

    def _enter_guest(self, deadline: float | None, timeout: float | None) -> None:
        budget_us = 0
        if deadline is not None:
            budget_us = int((deadline - perf_counter()) * 1e6)
            if budget_us <= 0:
                self.stop = _timed_out(timeout)
                return
        self._sliced = self._needs_slices()
        self.bad_access = None
        self._loop_wanted = False
        self._exits_before = self.stats.total_exits
        start = perf_counter()
        try:
            self.uc.emu_start(self.rip, END, timeout=budget_us, count=SLICE_INSNS if self._sliced else 0)
        except UcError as e:
            if self.stop is None:
                self.stop = self._unicorn_error(e)
        finally:
            self.stats.run_seconds += perf_counter() - start
        if self.stop is None:
            self._safely(self._returned, deadline, timeout)

    def _needs_slices(self) -> bool:
        """Whether the guest must be stopped now and then even if it never exits: time can raise
        an interrupt (a timer is armed), or one waits for the guest (behind IF, or a batched site)."""
        return self.clock.next_deadline != NEVER or self.pic.pending()

    def _safely(self, fn: Callable, *args) -> None:
        """Run a handler outside any hook with the same protection as one."""
        self.guard(fn, LOOP)(self.uc, *args, None)

    def _returned(self, deadline: float | None, timeout: float | None) -> None:
        """emu_start came back on its own: a hlt, the slice's or the run's end, or a hook's request."""
        rip = self.rip
        if deadline is not None and perf_counter() >= deadline:
            self.stop = _timed_out(timeout)
        elif rip - 1 in self.hlt_sites or not (self._sliced or self._loop_wanted) and self._after_hlt(rip):
            try:
                self.halt(bool(self.uc.reg_read(U.UC_X86_REG_RFLAGS) & RFLAGS_IF))
            except GuestFault as e:
                raise GuestFault(e.what, rip - 1) from None
        elif self._loop_wanted:
            pass
        elif self._sliced:                     # the instruction count ran out
            self.stats.slices += 1
            if self.stats.total_exits == self._exits_before:    # exits already made time pass
                self.clock.advance(SLICE_NS)
        else:
            raise GuestFault("emulation stopped unexpectedly")

    def _after_hlt(self, rip: int) -> bool:
        try:
            return self.mmu.read_virt(rip - 1, 1) == b"\xf4"
        except Refused:
            return False

    # -- interrupts -------------------------------------------------------------------------
    def interrupts_enabled(self) -> bool:
        """The guest's IF: RFLAGS.IF, or in pv the shared page's upcall mask clear."""
        if self.pv is not None:
            return not self.pv.masked()
        return bool(self.uc.reg_read(U.UC_X86_REG_RFLAGS) & RFLAGS_IF)

    def _can_take(self) -> bool:
        return self.pic.pending() and self.interrupts_enabled()

    def deliver_events(self) -> bool:
        """Deliver the PIC's pending interrupt if the guest can take it now; True if it did.

        The one place interrupts reach the guest: after every exit, at every
        slice end and re-entry, and so after every hlt or block.  Never while
        the guest's (virtual) IF is clear: then a pv guest gets
        `upcall_pending` set and the interrupt waits in the PIC.
        """
        pv = self.pv
        if not self.pic.pending():
            if pv is not None:
                pv.set_pending(False)
            return False
        if pv is None:
            if not self.uc.reg_read(U.UC_X86_REG_RFLAGS) & RFLAGS_IF:
                return False
        else:
            if pv.masked():
                pv.set_pending(True)
                return False
            if pv.in_batched_site(self._guest_pc()):
                self.stats.deferred += 1
                return False
            pv.flush_queue()
            if not self.pic.pending():          # the queue may have masked or acknowledged it
                pv.set_pending(False)
                return False
        vector = self.pic.acknowledge()
        self._enter(vector)
        if pv is not None:
            pv.set_pending(self.pic.pending())
        return True

    def _guest_pc(self) -> int:
        """The guest code being run: during a hypercall, the instruction after its call."""
        rip = self.resume_rip()
        if self.pv is not None and self.pv.in_hypercall_page(rip):
            try:
                return int.from_bytes(self.mmu.read_virt(self.uc.reg_read(U.UC_X86_REG_RSP), 8), "little")
            except Refused:
                return rip
        return rip

    def _enter(self, vector: int) -> None:
        """Take `vector` as the hardware does: through its gate, on an interrupt frame."""
        uc, pv = self.uc, self.pv
        kind = "upcall" if pv is not None else "interrupt"
        cs = uc.reg_read(U.UC_X86_REG_CS)
        rflags = uc.reg_read(U.UC_X86_REG_RFLAGS)
        frame = interrupts.Frame(self.resume_rip(), cs, rflags | RFLAGS_IF if pv is not None else rflags,
                                 uc.reg_read(U.UC_X86_REG_RSP), uc.reg_read(U.UC_X86_REG_SS))
        try:
            gate = interrupts.read_gate(self.mmu, self.read_table("idt"), vector, cs)
            uc.reg_write(U.UC_X86_REG_RSP, interrupts.push_frame(self.mmu, frame))
        except GuestFault as e:
            raise GuestFault(f"{kind} {vector}: {e.what}") from None
        rflags &= ~interrupts.CLEARED_ON_ENTRY
        if not gate.trap:
            if pv is not None:
                pv.set_mask(True)
            rflags &= ~RFLAGS_IF
        uc.reg_write(U.UC_X86_REG_RFLAGS, rflags)
        self._account(f"{kind} {vector}", lambda: frame.rip)
        self.jump(gate.handler)

    def iret(self) -> None:
        """Return from an interrupt: pop the frame at RSP (the iret hypercall; iretq in trap mode)."""
        uc = self.uc
        frame = interrupts.pop_frame(self.mmu, uc.reg_read(U.UC_X86_REG_RSP),
                                     uc.reg_read(U.UC_X86_REG_CS), uc.reg_read(U.UC_X86_REG_SS))
        rflags = uc.reg_read(U.UC_X86_REG_RFLAGS) & ~interrupts.RESTORABLE | frame.rflags & interrupts.RESTORABLE | 2
        if self.pv is not None:            # the virtual IF is the mask; the real one stays clear
            self.pv.set_mask(not frame.rflags & RFLAGS_IF)
            rflags &= ~RFLAGS_IF
        uc.reg_write(U.UC_X86_REG_RFLAGS, rflags)
        uc.reg_write(U.UC_X86_REG_RSP, frame.rsp)
        self.jump(frame.rip)

    def halt(self, interrupts_enabled: bool) -> None:
        """hlt / the block hypercall: idle until an interrupt can be taken.

        Idling takes no host time: the virtual clock skips to the earliest
        timer deadline that will raise an interrupt the PIC can deliver, and
        the interrupt is then delivered by the caller's next step (the check
        after every exit, or the run loop).  A pv guest whose events are
        masked returns at once if one is pending (`block` returns when an
        event is pending).  Nothing able to wake the guest is a fault."""
        if not interrupts_enabled:
            if self.pv is not None and self.pic.pending():
                return
            raise GuestFault("halted with interrupts disabled and nothing pending: blocked forever")
        if self.pic.pending():
            return
        wake = min((t.deadline for t in self.clock.armed() if self.pic.can_deliver(t.irq)), default=None)
        if wake is None:
            raise GuestFault("blocked forever: halted waiting for an interrupt, but no timer is armed "
                             "on an unmasked interrupt line")
        self.stats.idle_skips += 1
        self.stats.idle_ns += self.clock.skip_to(wake)

    # -- faults ---------------------------------------------------------------------------
    def _on_interrupt(self, intno: int) -> None:
        what = EXCEPTIONS.get(intno, f"software interrupt {intno:#x}")
        if intno == 14:
            what += f" accessing {self.uc.reg_read(U.UC_X86_REG_CR2):#x}"
        raise GuestFault(what)

    def _on_invalid_access(self, access: int, address: int, size: int, value: int) -> bool:
        if access == UC_MEM_WRITE_PROT and self.on_write_protect is not None:
            if self.on_write_protect(address, size, value & ((1 << 8 * size) - 1) if size <= 8 else value):
                return True
        self.bad_access = (access, address, size)
        return False

    def _unicorn_error(self, e: UcError) -> Stop:
        if e.errno == UC_ERR_INSN_INVALID:
            return self.fault(GuestFault("invalid opcode (#UD)"))
        if self.bad_access is not None:
            access, address, _ = self.bad_access
            return self.fault(GuestFault(f"{_ACCESS.get(access, 'access to')} guest-physical "
                                         f"{self.mmu.mem.describe(address)}"))
        return self.fault(GuestFault(f"unicorn stopped: {e}"))

    # -- privileged state shared by pv and trap ------------------------------------------------
    def read_cr(self, n: int) -> int:
        if n not in CONTROL:
            raise Refused(abi.EINVAL, f"no control register CR{n}")
        return self.uc.reg_read(CONTROL[n])

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
        self.uc.reg_write(CONTROL[n], value)

    def read_table(self, which: str) -> tuple[int, int]:
        """(limit, base) of the GDT or IDT register."""
        _, base, limit, _ = self.uc.reg_read(TABLE_REG[which])
        return limit, base

    def load_descriptor(self, which: str, ptr: int) -> None:
        """lgdt/lidt from the 10-byte descriptor at guest address `ptr`."""
        self.load_table(which, *DESCRIPTOR.unpack(self.mmu.read_virt(ptr, DESCRIPTOR.size)))

    def load_table(self, which: str, limit: int, base: int) -> None:
        """The table must be canonical and readable guest memory."""
        if limit > TABLE_MAX_LIMIT[which]:
            raise Refused(abi.EINVAL, f"{which.upper()} limit {limit:#x} is too large")
        if not canonical(base):
            raise Refused(abi.EINVAL, f"{which.upper()} base {base:#x} is not canonical")
        self.mmu.read_virt(base, limit + 1)      # Refused(EFAULT) unless all of it is readable
        self.uc.reg_write(TABLE_REG[which], (0, base, limit, 0))



"""What differs between the ways a guest runs: one object per mode, chosen at set-up.

- `Bare`: a native image on a bare machine.  Privileged instructions act on
  the vCPU directly; port I/O and cpuid reach the devices through Unicorn's
  instruction hooks.  The baseline.
- `Trap`: a native image under trap-and-emulate.  Every sensitive
  instruction the sweep finds exits (trapped.py), and every write to a live
  page table exits and is validated (pagetables.py), as shadow paging does;
  so do system calls and exceptions from user mode, which go to the
  monitor first.
- `Pv`: a paravirtualized image.  It reaches the hypervisor only through
  the hypercall page (hypercalls.py); its IF is the shared page's mask;
  system calls and exceptions bounce through the hypervisor, as in Xen.
- `Hvm`: a native image with the exit profile of VT-x with EPT and VPID:
  no exit for cli, sti, pushf, popf, page-table writes, CR3 loads, invlpg,
  syscall, sysret or guest exceptions; an exit for port I/O, hlt, cpuid,
  MSR accesses (but the FS/GS bases, passed through by the MSR bitmap),
  xsetbv, wbinvd/invd, external interrupts and the interrupt window.
- `HvmShadow`: VT-x without nested paging (first generation): everything
  in `Hvm`, plus the exits of shadow paging: CR3 loads, invlpg, guest page
  faults, and writes to guest page tables (write-protected, as
  shadow-paging monitors did).
  (docs/design.md cites the VM-execution controls of the Intel SDM behind
  each rule.)

A mode answers the rest of the runtime: which images it runs; which
instructions exit and under which name; whether exceptions and system
calls exit before the guest takes them; where the guest's IF lives and how
an interrupt waits for it; and which addresses the hypervisor may send
the guest to (pv: only validated instruction starts, rule R8 of
docs/abi.md).
"""
from __future__ import annotations

from bisect import bisect_right
from typing import TYPE_CHECKING

from pvimage import abi

from .devices.msr import FS_BASE, GS_BASE, KERNEL_GS_BASE, LSTAR
from .errors import GuestFault, ImageError, Refused
from .exits import hypercalls, trapped

if TYPE_CHECKING:
    from .machine import Vm

MASK = abi.SHARED_PAGE + abi.SH_UPCALL_MASK
PENDING = abi.SHARED_PAGE + abi.SH_UPCALL_PENDING
MC_COUNT = abi.SHARED_PAGE + abi.SH_MC_COUNT
ENTRIES_KEPT = 4096             # entry points remembered as checked (each a validated start: code never changes)


class Mode:
    name = ""
    image_mode = "native"          # the kind of image the mode runs
    tracks_tables = False          # the MMU validates and write-protects live page tables
    virtual_if = False             # the guest's IF is a flag in the shared page, not RFLAGS.IF
    watches_control_state = False  # CR0/CR3/CR4/EFER are the hypervisor's: checked at every exit
    port_hooks = True              # in/out/cpuid reach the hypervisor through Unicorn's instruction hooks
    window = False                 # an interrupt held behind IF opens the interrupt window (trapped.py)
    interrupt_kind = "interrupt"   # a delivered interrupt's name in the statistics
    exception_exits: frozenset[int] | None = frozenset()   # vectors that exit before the guest takes them (None: all)
    syscall_exits = False          # a system call from user mode exits before the kernel takes it
    exit_names: dict[str, str] = {}     # this mode's name for an exit (VT-x's exit reasons in hvm)
    passthrough_msrs: frozenset[int] = frozenset()   # MSRs read and written without an exit
    _entry_checked = 0             # the system-call entry last found valid (0: none)
    checked_entries: set[int] | None = None   # entry points already found good (None: the mode checks none)

    def exiting(self, insn) -> str | None:
        """The exit a sensitive instruction makes for the whole run, by name; None: it runs natively."""
        return None

    def exit_name(self, reason: str) -> str:
        return self.exit_names.get(reason, reason)

    def interrupts_enabled(self, vm: Vm) -> bool:
        return vm.cpu.interrupt_flag

    def may_deliver(self, vm: Vm) -> bool:
        """An interrupt is pending and the guest's IF is set: can it be taken right here?"""
        return not vm.cpu.in_interrupt_shadow

    def held(self, vm: Vm) -> None:
        """An interrupt is pending but the guest's IF is clear."""

    def nothing_pending(self, vm: Vm) -> None:
        """No interrupt is pending (any more)."""

    def delivered(self, vm: Vm) -> None:
        """An interrupt was just delivered."""

    def check_entry_point(self, vm: Vm, address: int, what: str) -> None:
        """Refuse a transfer the hypervisor is about to make into guest code.  Entries and returns
        (delivery.py) call it only in a mode that keeps `checked_entries`, for an address not in it."""

    def set_virtual_if(self, vm: Vm, enabled: bool) -> None:
        raise AssertionError(f"{self.name} mode has no virtual IF")

    def mask_virtual_if(self, vm: Vm, mask: bool = True) -> bool:
        """At an entry: the virtual IF as it was (the frame's IF), cleared if `mask`, in one call."""
        raise AssertionError(f"{self.name} mode has no virtual IF")

    def syscall_entry(self, vm: Vm) -> int:
        """Where `syscall` from user mode goes: LSTAR (set by wrmsr, or pv's set_syscall_entry)."""
        entry = vm.cpu.regs.msr(LSTAR)
        if entry != self._entry_checked:        # checked once per value, not at every system call
            if not entry:
                raise GuestFault("syscall from user mode, but the kernel registered no system-call entry (LSTAR)")
            self.check_entry_point(vm, entry, "system-call entry")
            self._entry_checked = entry
        return entry

    def kernel_stack(self, vm: Vm) -> int:
        """The stack an entry from user mode switches to: the TSS's rsp0, as on hardware."""
        raw = vm.cpu.regs.entry
        limit, base = raw.tr_limit.value, raw.tr_base.value
        if limit < 11:
            raise GuestFault("entry from user mode, but no TSS is loaded (ltr) to give the kernel stack")
        try:
            return int.from_bytes(vm.mmu.read_virt(base + 4, 8), "little")
        except Refused as e:
            raise GuestFault(f"cannot read rsp0 from the TSS at {base:#x}: {e.why}") from None


class Bare(Mode):
    name = "bare"
    window = True

    def held(self, vm: Vm) -> None:
        # Open the interrupt window: the instructions that can set IF exit until it is taken.
        trapped.open_window(vm)

    def delivered(self, vm: Vm) -> None:
        trapped.close_window(vm)


class Trap(Mode):
    name = "trap"
    tracks_tables = True
    watches_control_state = True
    port_hooks = False             # in/out are patched like every sensitive instruction
    exception_exits = None
    syscall_exits = True

    def exiting(self, insn) -> str | None:
        return trapped.exit_reason(insn)


class Hvm(Bare):
    """VT-x with EPT and VPID.  Each rule is a VM-execution control (Intel SDM vol. 3C, 24.6 and 25.1):
    unconditional I/O exiting, HLT exiting, CPUID and XSETBV and INVD exiting unconditionally,
    WBINVD exiting, MSR bitmaps (FS/GS bases passed through), external-interrupt exiting,
    interrupt-window exiting; EPT makes page-table writes, CR3 loads, invlpg and guest page faults
    the guest's own business (no CR3-load or INVLPG exiting, an exception bitmap without #PF)."""
    name = "hvm"
    interrupt_kind = "external interrupt"
    exit_names = {"port I/O in": "I/O instruction", "port I/O out": "I/O instruction", "cpuid": "CPUID"}
    passthrough_msrs = frozenset({FS_BASE, GS_BASE, KERNEL_GS_BASE})
    EXITING = {"hlt": "HLT", "rdmsr": "RDMSR", "wrmsr": "WRMSR", "xsetbv": "XSETBV", "wbinvd": "WBINVD",
               "invd": "INVD"}

    def exiting(self, insn) -> str | None:
        return self.EXITING.get(insn.mnemonic)


class HvmShadow(Hvm):
    """First-generation VT-x, without nested paging: the monitor keeps shadow page tables, so CR3 loads
    (CR3-load exiting), invlpg (INVLPG exiting) and guest page faults (#PF in the exception bitmap)
    exit, and so do writes to guest page tables, which it write-protects."""
    name = "hvm-shadow"
    tracks_tables = True
    exception_exits = frozenset({14})
    exit_names = {**Hvm.exit_names, "page-table write": "page-table write (shadow)"}

    def exiting(self, insn) -> str | None:
        reason = trapped.exit_reason(insn)
        if reason == "trap mov to cr3":
            return "CR3 load"
        if insn.mnemonic == "invlpg":
            return "INVLPG"
        return super().exiting(insn)


class Pv(Mode):
    """The shared page's upcall mask is the guest's IF (docs/abi.md sections 5 and 7).

    The guest flips the mask with plain stores, so the hypervisor reads it
    afresh whenever it considers an upcall.  `upcall_pending` tells a guest
    that unmasks whether to make the `event_check` hypercall.

    An upcall is also held back while the guest is appending to its
    multicall queue (records of kind SITE_BATCHED in `.pv.sites`): an upcall
    whose handler queues entries of its own would leave the guest writing a
    stale slot.  It waits for the next exit or slice end, as Xen fixes up an
    event that hits a critical region.  Otherwise the hypervisor runs a
    non-empty queue itself before the upcall, so a handler never sees
    half-applied updates."""
    name = "pv"
    image_mode = "pv"
    tracks_tables = True
    virtual_if = True
    watches_control_state = True
    interrupt_kind = "upcall"
    exception_exits = None         # every exception bounces through the hypervisor
    syscall_exits = True

    def __init__(self, image) -> None:
        self.kernel_sp: int | None = None               # stack_switch: the stack for entries from user mode
        self.hypercall_page: int = image.hypercall_page
        spans = sorted((s.address, s.address + s.length) for s in image.info.sites if s.batched)
        self._starts = [a for a, _ in spans]
        self._ends = [b for _, b in spans]
        self.code = image.code                          # the validator's proof: instruction starts (R8)
        self.checked_entries: set[int] = set()          # addresses check_entry_point has passed

    def interrupts_enabled(self, vm: Vm) -> bool:
        return vm.mem.view[MASK] == 0

    def may_deliver(self, vm: Vm) -> bool:
        if self.in_batched_site(self.guest_pc(vm)):
            vm.stats.deferred += 1
            return False
        if int.from_bytes(vm.mem.view[MC_COUNT:MC_COUNT + 4], "little"):
            hypercalls.run_queue_before_upcall(vm)
        return True

    def held(self, vm: Vm) -> None:
        self._set_pending(vm, True)

    def nothing_pending(self, vm: Vm) -> None:
        self._set_pending(vm, False)

    def delivered(self, vm: Vm) -> None:
        self._set_pending(vm, vm.pics.pending())

    def set_virtual_if(self, vm: Vm, enabled: bool) -> None:
        vm.mem.view[MASK] = 0 if enabled else 1       # the shared page: plain guest data

    def mask_virtual_if(self, vm: Vm, mask: bool = True) -> bool:
        view = vm.mem.view
        enabled = view[MASK] == 0
        if mask:
            view[MASK] = 1
        return enabled

    def _set_pending(self, vm: Vm, pending: bool) -> None:
        view = vm.mem.view
        if view[PENDING] != pending:
            view[PENDING] = pending

    def in_hypercall_page(self, rip: int) -> bool:
        return self.hypercall_page <= rip < self.hypercall_page + abi.PAGE_SIZE

    def in_batched_site(self, pc: int) -> bool:
        k = bisect_right(self._starts, pc) - 1
        return k >= 0 and pc < self._ends[k]

    def guest_pc(self, vm: Vm) -> int:
        """The guest code being run: during a hypercall, the call that made it."""
        rip = vm.cpu.resume_rip()
        if self.in_hypercall_page(rip):
            caller = hypercalls.caller(vm)
            return rip if caller is None else caller
        return rip

    def kernel_stack(self, vm: Vm) -> int:
        if self.kernel_sp is None:
            raise GuestFault("entry from user mode, but the kernel set no stack for it (stack_switch)")
        return self.kernel_sp

    def check_entry_point(self, vm: Vm, address: int, what: str) -> None:
        """Rule R8: the hypervisor sends the guest only to validated instruction starts."""
        if address in self.checked_entries:     # every bounce and iret asks: mostly the same few addresses
            return
        if address not in self.code.starts and address not in self.code.resume_points:
            raise GuestFault(f"{what}: {address:#x} is not an instruction start the validator saw (rule R8)")
        if len(self.checked_entries) >= ENTRIES_KEPT:
            self.checked_entries.clear()
        self.checked_entries.add(address)


MODES: dict[str, type[Mode]] = {"bare": Bare, "trap": Trap, "pv": Pv, "hvm": Hvm, "hvm-shadow": HvmShadow}


def choose(name: str | None, image) -> Mode:
    """The mode object for a run of `image` (default: pv for PV images, bare otherwise)."""
    if name is None:
        name = "pv" if image.mode == "pv" else "bare"
    if name not in MODES:
        raise ImageError(f"unknown mode {name!r} ({', '.join(MODES)})")
    cls = MODES[name]
    if image.mode != cls.image_mode:
        if cls.image_mode == "pv":
            raise ImageError("native image cannot run in pv mode (it has no PVTool PV note)")
        raise ImageError(f"PV image cannot run in {name} mode: it expects the hypercall page")
    return cls(image) if cls is Pv else cls()

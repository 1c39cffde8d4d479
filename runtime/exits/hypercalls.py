"""PV exits: the hypercall handlers, one function per hypercall, in one table.

A PV guest calls `hypercall_page + nr * 32`, where the runtime wrote the
stub of pvimage.abi.hypercall_stub: `mov eax, nr; syscall; ...`.  Unicorn's
`syscall` instruction hook is the exit (inside it RIP is the `syscall`
itself, RCX and R11 are untouched, and execution resumes after it; LSTAR
is never used).  The syscall exit (`syscall_exit`) refuses a `syscall` anywhere but the
hypercall page, reads rax = nr and the arguments the handler takes (rdi,
rsi, rdx, r10, r8, in that order), runs the handler and writes its result
to rax.  RCX and R11 keep their values; the ABI calls them clobbered.

Every handler validates its arguments: a bad guest pointer is -EFAULT
(pointers are guest-virtual, translated through the current page tables
and checked against what the guest itself may access), a bad value
-EINVAL, a forbidden page-table update -EPERM, an unknown number -ENOSYS.
Handlers raise `Refused`; the dispatcher turns it into the -errno result.
Each handler's work is bounded by its arguments (console_write by its
length, a multicall by the queue's 64 entries, new_baseptr by the tables
of the hierarchy, which the MMU also bounds).

A multicall entry the hypervisor refuses stops the guest by default, as a
fault naming the entry, its operation and the rule it broke (Linux on Xen
treats a failed mmu_update as a bug too); the entry's `result` field gets
the -errno either way (`Vm.run.lenient_batches` keeps the guest running).

The shared page mirrors the virtual CPU: `publish` rewrites the control
registers and descriptor-table images after every hypercall that changes
them, and SH_TIME gets the virtual TSC at each exit.
"""
from __future__ import annotations

import struct
from array import array
from dataclasses import dataclass
from operator import itemgetter
from typing import TYPE_CHECKING, Callable

from pvimage import abi

from .. import delivery
from ..cpu import DESCRIPTOR, RFLAGS_IF, SYSCALL_SIZE
from ..devices.bus import SIZES
from ..devices.msr import CANONICAL_TOPS, LSTAR, canonical
from ..engine import GPR_INDEX, HF_CPL_MASK, RIP_INDEX
from ..errors import GuestFault, Refused, Shutdown
from ..memory import PAGE

if TYPE_CHECKING:
    from ..machine import Vm

MASK64 = (1 << 64) - 1
CONSOLE_MAX = 1 << 20
ARGS = ("rdi", "rsi", "rdx", "r10", "r8")
_MC_ENTRY = struct.Struct("<5Q")
_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
SH_MC_COUNT = abi.SHARED_PAGE + abi.SH_MC_COUNT
SH_MC_ENTRIES = abi.SHARED_PAGE + abi.SH_MC_ENTRIES
_RESULT_LANE = 4                  # `result` is an entry's fifth u64
_CPU_STATE = struct.Struct("<4Q10s6s10s6s")   # SH_CR0 .. the end of SH_IDTR's slot
SH_TIME = abi.SHARED_PAGE + abi.SH_TIME
SH_CR3 = abi.SHARED_PAGE + abi.SH_CR3
_RSP, _RCX, _R11 = GPR_INDEX["rsp"], GPR_INDEX["rcx"], GPR_INDEX["r11"]


@dataclass(frozen=True)
class Hypercall:
    nr: int
    name: str
    reason: str           # its name in the exit statistics
    fn: Callable
    arity: int
    args: Callable | None  # its arguments from RegisterFile.gprs, in one C call (None: it takes none)


HYPERCALLS: dict[int, Hypercall] = {}


def hypercall(nr: int):
    """Register the decorated function as the handler of hypercall `nr`."""
    def register(fn: Callable) -> Callable:
        name = abi.HYPERCALL_NAMES[nr]
        arity = fn.__code__.co_argcount - 1
        HYPERCALLS[nr] = Hypercall(nr, name, f"hypercall {name}", fn, arity,
                                   _picker([GPR_INDEX[reg] for reg in ARGS[:arity]]))
        return fn
    return register


def _picker(indices: list[int]) -> Callable | None:
    if not indices:
        return None
    if len(indices) == 1:                 # itemgetter of one index gives the item, not a sequence
        return itemgetter(slice(indices[0], indices[0] + 1))
    return itemgetter(*indices)


# -- dispatch ----------------------------------------------------------------------------

def syscall_exit(vm: Vm) -> Callable[[Vm], None]:
    """The syscall hook's handler in pv mode, with what it reads at every exit bound once."""
    mode, clock, view = vm.mode, vm.clock, vm.mem.view
    gprs, hflags, count, get = vm.cpu.regs.gprs, vm.cpu.regs.hflags_word, vm.run.count, HYPERCALLS.get

    def on_syscall(vm: Vm) -> None:
        """A hypercall exit (or, from user mode, a system call to bounce)."""
        call = get(gprs[0])
        if call is None or hflags.value & HF_CPL_MASK or not 0 <= gprs[RIP_INDEX] - mode.hypercall_page < PAGE:
            return _not_a_hypercall(vm)
        count(call.reason, call_site)
        try:
            result = call.fn(vm) if call.args is None else call.fn(vm, *call.args(gprs))
        except GuestFault as e:
            if e.rip is None:             # report the guest code that called, not the stub
                e.rip = call_site(vm)
            raise
        except Refused as e:
            result = -e.errno
            if vm.trace:
                print(f"  hypercall {call.name} refused: -{e.errno}: {e.why}", file=vm.trace)
        if result is not None:            # None: the hypercall does not return (iret)
            gprs[0] = result              # a c_uint64: stored modulo 2**64, as -errno must be
        _U64.pack_into(view, SH_TIME, clock.ticks)     # the shared page: plain guest data
    return on_syscall


def _not_a_hypercall(vm: Vm) -> None:
    """A syscall from user mode (a system call, or a reach into the stubs), outside the hypercall
    page, or with a number no hypercall has."""
    regs = vm.cpu.regs
    rip, nr = regs.gprs[RIP_INDEX], regs.gprs[0]
    in_page = vm.mode.in_hypercall_page(rip)
    if regs.hflags_word.value & HF_CPL_MASK == 3:
        if not in_page:
            return user_syscall(vm)
        vm.run.count("hypercall from user mode", rip)     # no hypercalls from ring 3
        result = -abi.EPERM
    elif not in_page:
        raise GuestFault("syscall outside the hypercall page")
    else:
        vm.run.count("hypercall unknown", call_site)
        if vm.trace:
            print(f"  hypercall {nr} refused: -{abi.ENOSYS}: no hypercall number {nr}", file=vm.trace)
        result = -abi.ENOSYS
        _U64.pack_into(vm.mem.view, SH_TIME, vm.clock.ticks)
    regs.gprs[0] = result


def user_syscall(vm: Vm) -> None:
    """A user process's `syscall`: bounce it to the kernel's registered entry (Xen's syscall callback).

    As the CPU would: RCX = the next RIP, R11 = RFLAGS; then, as a Xen guest
    expects, on the kernel stack from `stack_switch` an interrupt frame back
    to the user (rip, cs, rflags, rsp, ss), events masked, ring 0."""
    cpu, mode = vm.cpu, vm.mode
    gprs = cpu.regs.gprs
    vm.run.count("system call", gprs[RIP_INDEX])
    entry = mode.syscall_entry(vm)
    rip = gprs[RIP_INDEX] + SYSCALL_SIZE
    rflags = cpu.rflags()
    if mode.mask_virtual_if(vm):            # events are masked on the way in, as for an interrupt gate
        rflags |= RFLAGS_IF
    frame = (rip, abi.USER_CS, rflags, gprs[_RSP], abi.USER_DS)
    try:
        rsp = delivery.push_frame(vm.mmu, frame, mode.kernel_stack(vm))
    except GuestFault as e:
        raise GuestFault(f"system call: {e.what}") from None
    gprs[_RCX], gprs[_R11], gprs[_RSP] = rip, rflags, rsp
    cpu.enter_ring(0)
    cpu.jump(entry)


def caller(vm: Vm) -> int | None:
    """The return address the hypercall stub will use: just after the guest's call."""
    try:
        return int.from_bytes(vm.mmu.read_virt(vm.cpu.regs["rsp"], 8), "little")
    except Refused:
        return None


def call_site(vm: Vm) -> int | None:
    """Where the guest made the hypercall: the last byte of its call (same line as `pvtool diff` shows)."""
    ret = caller(vm)
    return None if ret is None else ret - 1


def publish(vm: Vm) -> None:
    """Copy the virtual CPU's control registers and descriptor tables into the shared page."""
    cpu = vm.cpu
    gdt, idt = cpu.read_table("gdt"), cpu.read_table("idt")
    vm.mem.write(abi.SHARED_PAGE + abi.SH_CR0, _CPU_STATE.pack(
        cpu.read_cr(0), cpu.read_cr(2), cpu.read_cr(3), cpu.read_cr(4),
        DESCRIPTOR.pack(*gdt), b"", DESCRIPTOR.pack(*idt), b""))


def _u32(value: int, what: str) -> int:
    if value > 0xFFFFFFFF:
        raise Refused(abi.EINVAL, f"{what} {value:#x} does not fit in 32 bits")
    return value


# -- the hypercalls ------------------------------------------------------------------------

@hypercall(abi.HC_CONSOLE_WRITE)
def console_write(vm: Vm, buf: int, length: int) -> int:
    if length > CONSOLE_MAX:
        raise Refused(abi.EINVAL, f"console_write of {length} bytes (at most {CONSOLE_MAX})")
    vm.console.write(vm.mmu.read_virt(buf, length))
    return length


@hypercall(abi.HC_SHUTDOWN)
def shutdown(vm: Vm, status: int) -> int:
    raise Shutdown(status & 0xFF)


@hypercall(abi.HC_SET_PTE)
def set_pte(vm: Vm, ptr: int, value: int) -> int:
    vm.mmu.set_pte(ptr, value)
    return 0


@hypercall(abi.HC_INVLPG)
def invlpg(vm: Vm, va: int) -> int:
    if not canonical(va):
        raise Refused(abi.EINVAL, f"invlpg of non-canonical address {va:#x}")
    vm.mmu.flush(va)
    return 0


@hypercall(abi.HC_NEW_BASEPTR)
def new_baseptr(vm: Vm, cr3: int) -> int:
    vm.mmu.load_root(cr3)
    _U64.pack_into(vm.mem.view, SH_CR3, cr3)     # of the state publish() shows, only CR3 changed (as given)
    return 0


@hypercall(abi.HC_WRITE_CR)
def write_cr(vm: Vm, n: int, value: int) -> int:
    if n not in (0, 4):
        raise Refused(abi.EINVAL, f"write_cr to CR{n}: only CR0 and CR4")
    vm.cpu.write_cr(n, value)
    publish(vm)
    return 0


def _load_descriptor(vm: Vm, which: str, ptr: int) -> None:
    limit, base = DESCRIPTOR.unpack(vm.mmu.read_virt(ptr, DESCRIPTOR.size))
    vm.cpu.load_table(which, limit, base, vm.mmu.read_virt)
    publish(vm)


@hypercall(abi.HC_SET_GDT)
def set_gdt(vm: Vm, ptr: int) -> int:
    _load_descriptor(vm, "gdt", ptr)
    return 0


@hypercall(abi.HC_SET_TRAP_TABLE)
def set_trap_table(vm: Vm, ptr: int) -> int:
    _load_descriptor(vm, "idt", ptr)
    return 0


@hypercall(abi.HC_RDMSR)
def rdmsr(vm: Vm, msr: int) -> int:
    value = vm.msrs.read(_u32(msr, "MSR number"))
    vm.mem.write_u64(abi.SHARED_PAGE + abi.SH_HC_VALUE, value)
    return 0


@hypercall(abi.HC_WRMSR)
def wrmsr(vm: Vm, msr: int, value: int) -> int:
    vm.cpu.regs.store()
    vm.msrs.write(_u32(msr, "MSR number"), value)
    vm.cpu.regs.invalidate()
    vm.cpu.remember_control_state()
    return 0


@hypercall(abi.HC_CPUID)
def cpuid(vm: Vm, leaf: int, out: int) -> int:
    regs = vm.cpuid.query(_u32(leaf, "cpuid leaf"))
    vm.mmu.write_virt(out, struct.pack("<4I", *regs))
    return 0


def _port(port: int, size: int) -> None:
    if port > 0xFFFF:
        raise Refused(abi.EINVAL, f"port {port:#x} is not a 16-bit port")
    if size not in SIZES:
        raise Refused(abi.EINVAL, f"port access size {size} (1, 2 or 4)")


@hypercall(abi.HC_IO_IN)
def io_in(vm: Vm, port: int, size: int) -> int:
    _port(port, size)
    return vm.bus.read(port, size)


@hypercall(abi.HC_IO_OUT)
def io_out(vm: Vm, port: int, size: int, value: int) -> int:
    _port(port, size)
    if value >> (8 * size):
        raise Refused(abi.EINVAL, f"value {value:#x} does not fit in {size} bytes")
    vm.bus.write(port, size, value)
    return 0


@hypercall(abi.HC_BLOCK)
def block(vm: Vm) -> int:
    """Idle until an event is pending; the upcall follows at once if events are unmasked."""
    vm.run.halt(interrupts_enabled=vm.mode.interrupts_enabled(vm))
    return 0


@hypercall(abi.HC_RDTSC)
def rdtsc(vm: Vm) -> int:
    return vm.clock.read_tsc()


@hypercall(abi.HC_WBINVD)
def wbinvd(vm: Vm) -> int:
    return 0


@hypercall(abi.HC_MULTICALL)
def multicall(vm: Vm) -> int:
    return run_queue(vm)


@hypercall(abi.HC_EVENT_CHECK)
def event_check(vm: Vm) -> int:
    """The exit is the point: pending events are delivered after every exit (run.py)."""
    return 0


_IRET_SAVED = struct.Struct(f"<{len(abi.IRET_SAVED)}Q")
_IRET_SAVED_INDEX = tuple(GPR_INDEX[name] for name in abi.IRET_SAVED)
_IRET_STACK = struct.Struct(f"<{len(abi.IRET_SAVED) + delivery.FRAME.size // 8}Q")   # saved, then the frame


@hypercall(abi.HC_IRET)
def iret(vm: Vm) -> None:
    """Pop what the iret entry saved (rax, r11, rcx: its own instructions overwrite them), then
    the frame above it, in one read; the mask follows the saved IF.  Anything still pending
    follows at once."""
    regs = vm.cpu.regs
    gprs = regs.gprs
    rsp = gprs[_RSP]
    try:
        words = _IRET_STACK.unpack(vm.mmu.read_virt(rsp, _IRET_STACK.size))
    except Refused:
        return _iret_in_pieces(vm, rsp)     # to say which part cannot be read
    for k, value in zip(_IRET_SAVED_INDEX, words):
        gprs[k] = value
    raw = regs.entry
    frame = delivery.check_frame(words[len(_IRET_SAVED_INDEX):], rsp + _IRET_SAVED.size, raw.cs.value, raw.ss.value)
    delivery.resume(vm, frame)
    return None


def _iret_in_pieces(vm: Vm, rsp: int) -> None:
    regs = vm.cpu.regs
    try:
        saved = _IRET_SAVED.unpack(vm.mmu.read_virt(rsp, _IRET_SAVED.size))
    except Refused as e:
        raise GuestFault(f"iret: the saved registers at {rsp:#x} cannot be read: {e.why}") from None
    for k, value in zip(_IRET_SAVED_INDEX, saved):
        regs.gprs[k] = value
    regs.gprs[_RSP] = rsp + _IRET_SAVED.size
    delivery.iret(vm)


@hypercall(abi.HC_SET_TIMER)
def set_timer(vm: Vm, deadline: int) -> int:
    """One-shot: raise IRQ 0 when the virtual clock reaches `deadline` ns (0 cancels; a past one fires now)."""
    vm.clock.arm(vm.oneshot, deadline or None)
    return 0


@hypercall(abi.HC_STACK_SWITCH)
def stack_switch(vm: Vm, sp: int) -> int:
    """The kernel stack for the next entry from user mode (Xen's stack_switch)."""
    if not canonical(sp):
        raise Refused(abi.EINVAL, f"stack pointer {sp:#x} is not canonical")
    vm.mode.kernel_sp = sp
    return 0


@hypercall(abi.HC_SET_SYSCALL_ENTRY)
def set_syscall_entry(vm: Vm, address: int) -> int:
    """Where a user `syscall` enters the kernel (Xen's syscall callback): LSTAR, as the wrmsr hypercall sets it."""
    vm.cpu.regs.store()
    vm.msrs.write(LSTAR, address)
    return 0


# -- the multicall queue -----------------------------------------------------------------------

def run_queue(vm: Vm) -> int:
    """Run and empty the shared-page queue; returns how many entries ran.

    A run of set_pte entries into one page-table page is validated and
    written in one piece (Mmu.set_leaves), and a run of invlpg entries is one
    flush: most of a busy kernel's queue.  Anything else, or a run with an
    entry to refuse, goes entry by entry.  The results go back in one store
    (with those of entries that did not run, after a refusal, as they were)."""
    view = vm.mem.view
    count = _U32.unpack_from(view, SH_MC_COUNT)[0]
    if count > abi.MC_MAX:
        raise Refused(abi.EINVAL, f"multicall queue holds {count} entries (at most {abi.MC_MAX})")
    queue = view[SH_MC_ENTRIES:SH_MC_ENTRIES + count * _MC_ENTRY.size]
    entries = list(_MC_ENTRY.iter_unpack(queue))
    results = array("Q", bytes(8 * count))       # every batchable call returns 0 when it succeeds
    k = 0
    try:
        with vm.mmu.batch():
            while k < count:
                k = _run_from(vm, entries, k, results)
    finally:
        if k < count and results[k]:          # refused: entry k has its result; those after keep theirs
            k += 1
        queue.cast("Q")[_RESULT_LANE:k * _MC_ENTRY.size // 8:_MC_ENTRY.size // 8] = results[:k]
        _U32.pack_into(view, SH_MC_COUNT, 0)
    return count


_SET_PTE, _INVLPG = abi.HC_SET_PTE, abi.HC_INVLPG


def _run_from(vm: Vm, entries: list[tuple[int, ...]], k: int, results: array) -> int:
    """Run entry k, with the like entries after it when they can go as one; the next entry to run."""
    nr, arg = entries[k][:2]
    end, n = k + 1, len(entries)
    if nr == _SET_PTE:
        page = arg & ~(PAGE - 1)
        while end < n and entries[end][0] == _SET_PTE and entries[end][1] & ~(PAGE - 1) == page:
            end += 1
        if vm.mmu.set_leaves(page, [(e[1] - page, e[2]) for e in entries[k:end]]):
            vm.stats.batched["set_pte"] += end - k
            return end
    elif nr == _INVLPG and canonical(arg):     # a run of flushes, checked in one loop
        while end < n and entries[end][0] == _INVLPG and entries[end][1] >> 47 in CANONICAL_TOPS:
            end += 1
        flush = vm.mmu.flush
        for entry in entries[k:end]:
            flush(entry[1])
        vm.stats.batched["invlpg"] += end - k
        return end
    _run_entry(vm, k, entries[k], results)
    return k + 1


def _run_entry(vm: Vm, k: int, entry: tuple[int, ...], results: array) -> None:
    """One multicall entry: its result, or the guest stopped for a refusal."""
    nr, a0, a1, a2, queued_at = entry
    try:
        if nr not in abi.BATCHABLE:
            raise Refused(abi.EINVAL, f"hypercall {abi.HYPERCALL_NAMES.get(nr, nr)} cannot be batched")
        call = HYPERCALLS[nr]
        results[k] = call.fn(vm, *(a0, a1, a2)[:call.arity]) & MASK64
        vm.stats.batched[call.name] += 1
    except Refused as e:
        results[k] = -e.errno & MASK64
        if not vm.run.lenient_batches:
            raise GuestFault(_refusal(vm, k, nr, queued_at, e), _queued_at(vm, queued_at)) from None


def _queued_at(vm: Vm, value: int) -> int | None:
    """The entry's result field, if the guest stored the address of the code that queued it there."""
    return value if value and vm.image.info.function_at(value) else None


def _refusal(vm: Vm, k: int, nr: int, queued_at: int, e: Refused) -> str:
    name = abi.HYPERCALL_NAMES.get(nr, f"hypercall {nr}")
    return f"multicall entry {k} ({name}) refused with -{_ERRNO.get(e.errno, e.errno)}: {e.why}"


_ERRNO = {abi.EPERM: "EPERM", abi.EFAULT: "EFAULT", abi.EINVAL: "EINVAL", abi.ENOSYS: "ENOSYS"}


def run_queue_before_upcall(vm: Vm) -> None:
    """The hypervisor runs a non-empty queue itself before an upcall (docs/abi.md section 5)."""
    try:
        run_queue(vm)
    except Refused as e:
        raise GuestFault(f"the multicall queue cannot run before an upcall: {e.why}") from None

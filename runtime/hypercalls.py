"""PV exits: the hypercall handlers, one function per hypercall, and their dispatch.

A PV guest calls `hypercall_page + nr * 32`, where the runtime wrote
`mov eax, nr; syscall; ret`.  Unicorn's `syscall` instruction hook is the
exit (found by experiment: inside the hook RIP is the `syscall` itself,
RCX and R11 are untouched and execution resumes after it; LSTAR is never
used).  The dispatcher refuses a `syscall` anywhere but the hypercall page,
reads rax = nr and the arguments the handler takes (rdi, rsi, rdx, r10,
r8, in that order), runs the handler and writes the result to rax.  RCX
and R11 keep their values; the ABI calls them clobbered, so no guest can
rely on that (a real `syscall` would overwrite them; faking it costs a
third of a round trip).

Every handler validates its arguments: a bad guest pointer is -EFAULT
(pointers are guest-virtual, translated through the current page tables
and checked against what the guest itself may access), a bad value
-EINVAL, a forbidden page-table update -EPERM, an unknown number -ENOSYS.
Handlers raise `Refused`; the dispatcher turns it into the -errno result.
The dispatcher also checks that CR3 is still the root the MMU validated:
a `mov cr3` hidden from the sweep (inside another instruction's bytes)
is caught at the guest's next hypercall.

Events (docs/abi.md section 7): `block` idles the vCPU until an event can
be taken, `iret` pops an interrupt frame, `set_timer` arms the one-shot
timer on IRQ 0, `event_check` is an exit and nothing more.  Delivery itself
is `Vcpu.deliver_events`, which runs after every hypercall, once the result
is in rax: an upcall's frame returns to the stub's `ret` with the result.

The shared page mirrors the virtual CPU: `publish` rewrites the control
registers and descriptor-table images after every hypercall that changes
them, and SH_TIME gets the virtual TSC at each exit.
"""
from __future__ import annotations

from collections import Counter

import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

from unicorn import x86_const as U

from pvimage import abi

from .devices import SIZES
from .devices.msr import canonical
from .errors import GuestFault, Refused, Shutdown
from .memory import PAGE
from .vcpu import DESCRIPTOR

if TYPE_CHECKING:
    from .hypervisor import Machine

MASK64 = (1 << 64) - 1
CONSOLE_MAX = 1 << 20
_ARGS = (U.UC_X86_REG_RDI, U.UC_X86_REG_RSI, U.UC_X86_REG_RDX,
         U.UC_X86_REG_R10, U.UC_X86_REG_R8)
_MC_ENTRY = struct.Struct("<5Q")
_RESULT = struct.Struct("<Q")
_RESULT_AT = 32                   # offset of `result` in an entry
_CPU_STATE = struct.Struct("<4Q10s6s10s6s")   # SH_CR0 .. the end of SH_IDTR's slot


@dataclass(frozen=True)
class Hypercall:
    nr: int
    name: str
    fn: Callable
    arity: int


HYPERCALLS: dict[int, Hypercall] = {}


def hypercall(nr: int):
    """Register the decorated function as the handler of hypercall `nr`."""
    def register(fn: Callable) -> Callable:
        HYPERCALLS[nr] = Hypercall(nr, abi.HYPERCALL_NAMES[nr], fn, fn.__code__.co_argcount - 1)
        return fn
    return register


# -- dispatch ----------------------------------------------------------------------------

def on_syscall(vm: Machine) -> None:
    """The syscall hook: one hypercall exit."""
    uc = vm.uc
    rip = vm.vcpu.rip
    page = vm.image.hypercall_page
    if not page <= rip < page + PAGE:
        raise GuestFault("syscall outside the hypercall page")
    nr = uc.reg_read(U.UC_X86_REG_RAX)
    call = HYPERCALLS.get(nr)
    vm.vcpu.count(f"hypercall {call.name if call else 'unknown'}", lambda: _caller(vm))
    if uc.reg_read(U.UC_X86_REG_CR3) & ~0xFFF != vm.mmu.root:
        raise GuestFault("CR3 changed without the new_baseptr hypercall")
    try:
        if call is None:
            raise Refused(abi.ENOSYS, f"no hypercall number {nr}")
        result = call.fn(vm, *(uc.reg_read(r) for r in _ARGS[:call.arity]))   # one by one: faster than a batch
    except GuestFault as e:
        if e.rip is None:             # report the guest code that called, not the stub
            e.rip = _caller(vm)
        raise
    except Refused as e:
        result = -e.errno
        if vm.vcpu.trace:
            print(f"  hypercall {call.name if call else nr} refused: -{e.errno}: {e.why}", file=vm.vcpu.trace)
    if result is not None:                # None: the hypercall does not return (iret)
        uc.reg_write(U.UC_X86_REG_RAX, result & MASK64)
    if vm.clock.ticks != vm.published_tsc:
        vm.published_tsc = vm.clock.ticks
        vm.mem.write_u64(abi.SHARED_PAGE + abi.SH_TIME, vm.clock.ticks)


def _caller(vm: Machine) -> int | None:
    """The return address the hypercall stub will use: the instruction after the guest's call."""
    try:
        return int.from_bytes(vm.mmu.read_virt(vm.uc.reg_read(U.UC_X86_REG_RSP), 8), "little")
    except Refused:
        return None


def publish(vm: Machine) -> None:
    """Copy the virtual CPU's control registers and descriptor tables into the shared page."""
    cpu = vm.vcpu
    gdt, idt = cpu.read_table("gdt"), cpu.read_table("idt")
    vm.mem.write(abi.SHARED_PAGE + abi.SH_CR0, _CPU_STATE.pack(
        cpu.read_cr(0), cpu.read_cr(2), cpu.read_cr(3), cpu.read_cr(4),
        DESCRIPTOR.pack(*gdt), b"", DESCRIPTOR.pack(*idt), b""))


def _shared(vm: Machine, offset: int, size: int) -> int:
    return int.from_bytes(vm.mem.read(abi.SHARED_PAGE + offset, size), "little")


def _u32(value: int, what: str) -> int:
    if value > 0xFFFFFFFF:
        raise Refused(abi.EINVAL, f"{what} {value:#x} does not fit in 32 bits")
    return value


# -- the hypercalls ------------------------------------------------------------------------

@hypercall(abi.HC_CONSOLE_WRITE)
def console_write(vm: Machine, buf: int, length: int) -> int:
    if length > CONSOLE_MAX:
        raise Refused(abi.EINVAL, f"console_write of {length} bytes (at most {CONSOLE_MAX})")
    vm.console.write(vm.mmu.read_virt(buf, length))
    return length


@hypercall(abi.HC_SHUTDOWN)
def shutdown(vm: Machine, status: int) -> int:
    raise Shutdown(status & 0xFF)


@hypercall(abi.HC_SET_PTE)
def set_pte(vm: Machine, ptr: int, value: int) -> int:
    vm.mmu.set_pte(ptr, value)
    return 0


@hypercall(abi.HC_INVLPG)
def invlpg(vm: Machine, va: int) -> int:
    if not canonical(va):
        raise Refused(abi.EINVAL, f"invlpg of non-canonical address {va:#x}")
    vm.mmu.flush()
    return 0


@hypercall(abi.HC_NEW_BASEPTR)
def new_baseptr(vm: Machine, cr3: int) -> int:
    vm.mmu.load_root(cr3)
    publish(vm)
    return 0


@hypercall(abi.HC_WRITE_CR)
def write_cr(vm: Machine, n: int, value: int) -> int:
    if n not in (0, 4):
        raise Refused(abi.EINVAL, f"write_cr to CR{n}: only CR0 and CR4")
    vm.vcpu.write_cr(n, value)
    publish(vm)
    return 0


@hypercall(abi.HC_SET_GDT)
def set_gdt(vm: Machine, ptr: int) -> int:
    vm.vcpu.load_descriptor("gdt", ptr)
    publish(vm)
    return 0


@hypercall(abi.HC_SET_TRAP_TABLE)
def set_trap_table(vm: Machine, ptr: int) -> int:
    vm.vcpu.load_descriptor("idt", ptr)
    publish(vm)
    return 0


@hypercall(abi.HC_RDMSR)
def rdmsr(vm: Machine, msr: int) -> int:
    value = vm.msrs.read(_u32(msr, "MSR number"))
    vm.mem.write_u64(abi.SHARED_PAGE + abi.SH_HC_VALUE, value)
    return 0


@hypercall(abi.HC_WRMSR)
def wrmsr(vm: Machine, msr: int, value: int) -> int:
    vm.msrs.write(_u32(msr, "MSR number"), value)
    return 0


@hypercall(abi.HC_CPUID)
def cpuid(vm: Machine, leaf: int, out: int) -> int:
    regs = vm.cpuid.query(_u32(leaf, "cpuid leaf"))
    vm.mmu.write_virt(out, struct.pack("<4I", *regs))
    return 0


def _port(port: int, size: int) -> None:
    if port > 0xFFFF:
        raise Refused(abi.EINVAL, f"port {port:#x} is not a 16-bit port")
    if size not in SIZES:
        raise Refused(abi.EINVAL, f"port access size {size} (1, 2 or 4)")


@hypercall(abi.HC_IO_IN)
def io_in(vm: Machine, port: int, size: int) -> int:
    _port(port, size)
    return vm.bus.read(port, size)


@hypercall(abi.HC_IO_OUT)
def io_out(vm: Machine, port: int, size: int, value: int) -> int:
    _port(port, size)
    if value >> (8 * size):
        raise Refused(abi.EINVAL, f"value {value:#x} does not fit in {size} bytes")
    vm.bus.write(port, size, value)
    return 0


@hypercall(abi.HC_BLOCK)
def block(vm: Machine) -> int:
    """Idle until an event is pending; the upcall follows at once if events are unmasked."""
    vm.vcpu.halt(interrupts_enabled=vm.vcpu.interrupts_enabled())
    return 0


@hypercall(abi.HC_RDTSC)
def rdtsc(vm: Machine) -> int:
    return vm.clock.read_tsc()


@hypercall(abi.HC_WBINVD)
def wbinvd(vm: Machine) -> int:
    return 0


@hypercall(abi.HC_MULTICALL)
def multicall(vm: Machine) -> int:
    count = _shared(vm, abi.SH_MC_COUNT, 4)
    if count > abi.MC_MAX:
        raise Refused(abi.EINVAL, f"multicall queue holds {count} entries (at most {abi.MC_MAX})")
    at = abi.SHARED_PAGE + abi.SH_MC_ENTRIES
    queue = bytearray(vm.mem.read(at, count * _MC_ENTRY.size))
    numbers = []
    with vm.mmu.batch():
        for k, (nr, a0, a1, a2, _) in enumerate(_MC_ENTRY.iter_unpack(bytes(queue))):
            numbers.append(nr)
            _RESULT.pack_into(queue, k * _MC_ENTRY.size + _RESULT_AT, _batched(vm, nr, a0, a1, a2) & MASK64)
    for nr, n in Counter(numbers).items():
        if nr in abi.BATCHABLE:
            vm.stats.batched[abi.HYPERCALL_NAMES[nr]] += n
    vm.mem.write(at, bytes(queue))
    vm.mem.write(abi.SHARED_PAGE + abi.SH_MC_COUNT, b"\0\0\0\0")
    return count


def _batched(vm: Machine, nr: int, a0: int, a1: int, a2: int) -> int:
    try:
        if nr == abi.HC_SET_PTE:
            return set_pte(vm, a0, a1)
        if nr == abi.HC_INVLPG:
            return invlpg(vm, a0)
        if nr == abi.HC_IO_OUT:
            return io_out(vm, a0, a1, a2)
    except Refused as e:
        return -e.errno
    return -abi.EINVAL


@hypercall(abi.HC_EVENT_CHECK)
def event_check(vm: Machine) -> int:
    """The exit is the point: pending events are delivered after every exit (Vcpu.deliver_events)."""
    return 0


@hypercall(abi.HC_IRET)
def iret(vm: Machine) -> None:
    """Pop the frame at rsp; the mask follows the saved IF.  Anything still pending follows at once."""
    vm.vcpu.iret()
    return None


@hypercall(abi.HC_SET_TIMER)
def set_timer(vm: Machine, deadline: int) -> int:
    """One-shot: raise IRQ 0 when the virtual clock reaches `deadline` ns (0 cancels; a past one fires now)."""
    vm.clock.arm(vm.oneshot, deadline or None)
    return 0

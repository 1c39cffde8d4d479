"""Interrupts and time in the runtime: the virtual clock, the PIT, the PICs, delivery and upcalls.

The claim everything rests on: an interrupt never reaches a guest whose
(virtual) IF is clear, in any mode.  Small PVK kernels built here record,
in their handlers, whether they ran inside a masked section; the rest
drives the devices and the vCPU directly.
"""
from __future__ import annotations

import re
import struct
import threading
from pathlib import Path

import pytest
from unicorn import UC_HOOK_CODE, UC_HOOK_INSN
from unicorn import x86_const as U

from pvimage import abi
from pvtool import driver
from runtime import delivery
from runtime.exits import hypercalls
from runtime.clock import EXIT_NS, TSC_STEP, Timer, VirtualClock
from runtime.devices.bus import IoBus
from runtime.devices.cpuid import Cpuid
from runtime.devices.msr import LSTAR
from runtime.devices.pic import PicPair
from runtime.devices.pit import PIT_HZ, Pit8254
from runtime.errors import GuestFault
from runtime.hypervisor import create, run
from runtime.loader import load_image
from runtime.machine import Vm
from test_runtime_unicorn import CODE, END, HLT, machine   # the bare-CPU helper (not its tests)

ROOT = Path(__file__).resolve().parents[1]
LIB = ROOT / "kernels" / "lib"
RAM = 64 << 20
IF = 1 << 9
MODES = ("bare", "trap", "pv")


def build(tmp_path: Path, name: str, body: str, target: str) -> bytes:
    src = tmp_path / f"{name}.pvk"
    src.write_text(f'import "{LIB}/console.pvk";\nimport "{LIB}/irq.pvk";\n' + body)
    return driver.compile_file(str(src), target)


def run_kernel(tmp_path: Path, name: str, body: str, mode: str):
    result = run(build(tmp_path, name, body, "pv" if mode == "pv" else "native"), mode, timeout=60)
    assert result.reason == "shutdown", result.message
    return result


def values(console: bytes) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"^([\w ]+): (\d+)$", console.decode(), re.M)}


# -- the virtual clock ------------------------------------------------------------------------

def test_clock_fires_timers_in_deadline_order_and_rearms_them():
    clock, fired = VirtualClock(), []

    def periodic(when):
        fired.append(("p", when))
        return when + 300
    clock.arm(clock.add(Timer("p", 0, periodic)), 300)
    clock.arm(clock.add(Timer("o", 0, lambda when: fired.append(("o", when)))), 500)
    clock.advance(1000)
    assert fired == [("p", 300), ("o", 500), ("p", 600), ("p", 900)] and clock.next_deadline == 1200


def test_clock_arming_a_past_deadline_fires_at_once_and_none_cancels():
    clock, fired = VirtualClock(ticks=5000), []
    t = clock.add(Timer("t", 0, fired.append))
    clock.arm(t, 10)
    assert fired == [10] and t.deadline is None
    clock.arm(t, 9000)
    clock.arm(t, None)
    clock.advance(10_000)
    assert fired == [10]


def test_exits_and_tsc_reads_cost_fixed_virtual_time():
    clock = VirtualClock()
    assert clock.skip_to(5000) == 5000 and clock.skip_to(10) == 0
    assert clock.read_tsc() == 5000 + TSC_STEP


# -- the PIT ----------------------------------------------------------------------------------

def pit_counting(mode_byte: int, divisor: int):
    clock, irqs = VirtualClock(), []
    pit = Pit8254(clock, irqs.append)
    pit.io_write(0x43, 1, mode_byte)
    pit.io_write(0x40, 1, divisor & 0xFF)
    pit.io_write(0x40, 1, divisor >> 8)
    return clock, pit, irqs


@pytest.mark.parametrize("mode_byte", [0x34, 0x36])          # rate generator, square wave
def test_pit_periodic_rate_follows_the_virtual_clock(mode_byte):
    clock, _, irqs = pit_counting(mode_byte, PIT_HZ // 1000)  # 1000 Hz
    for _ in range(20_000):                                   # 1 s of virtual time in 50 us steps
        clock.advance(50_000)
    assert irqs == [0] * 1000


def test_pit_deadlines_do_not_drift():
    divisor = 1193
    clock, pit, irqs = pit_counting(0x34, divisor)
    clock.skip_to(10**9 - 1)
    period_k = lambda k: -(-k * divisor * 10**9 // PIT_HZ)   # noqa: E731
    assert clock.next_deadline == period_k(1001) > 10**9 - 1 > period_k(1000)
    assert len(irqs) == 1                                     # one jump: the periods coalesce


def test_pit_mode0_interrupts_once_and_divisor_zero_is_65536():
    clock, _, irqs = pit_counting(0x30, 0)
    assert clock.next_deadline == -(-65536 * 10**9 // PIT_HZ)           # 54.9 ms
    clock.advance(10**9)
    assert irqs == [0] and clock.next_deadline > 10**18


def test_pit_low_byte_only_access_and_control_word_stops_the_channel():
    clock, irqs = VirtualClock(), []
    pit = Pit8254(clock, irqs.append)
    pit.io_write(0x43, 1, 0x14)                                # channel 0, low byte only, mode 2
    pit.io_write(0x40, 1, 100)
    assert clock.next_deadline == -(-100 * 10**9 // PIT_HZ)
    pit.io_write(0x43, 1, 0x34)                                # reprogramming stops it until a count
    clock.advance(10**9)
    assert irqs == []


def test_pit_latch_and_read_the_count():
    clock, pit, _ = pit_counting(0x34, 10_000)
    clock.advance(1000 * 10**9 // PIT_HZ + 1)                  # 1000 input ticks
    pit.io_write(0x43, 1, 0x00)                                # latch channel 0
    clock.advance(5_000_000)                                   # the latched value does not move
    count = pit.io_read(0x40, 1) | pit.io_read(0x40, 1) << 8
    assert count == 9000
    live = pit.io_read(0x40, 1) | pit.io_read(0x40, 1) << 8    # ~5966 ticks later, live
    assert abs(live - (count - 5966)) < 10


# -- the PICs ---------------------------------------------------------------------------------

def initialised_pics(mask1: int = 0x00, mask2: int = 0x00, icw4: int = 1) -> tuple[IoBus, PicPair]:
    bus, pics = IoBus(), PicPair()
    pics.attach(bus)
    for port, value in ((0x20, 0x11), (0xA0, 0x11), (0x21, 0x20), (0xA1, 0x28), (0x21, 4), (0xA1, 2),
                        (0x21, icw4), (0xA1, icw4), (0x21, mask1), (0xA1, mask2)):
        bus.write(port, 1, value)
    return bus, pics


def irr_isr(bus: IoBus, cmd: int) -> tuple[int, int]:
    bus.write(cmd, 1, 0x0A)
    irr = bus.read(cmd, 1)
    bus.write(cmd, 1, 0x0B)
    return irr, bus.read(cmd, 1)


def test_pic_mask_holds_a_request_that_irr_still_shows():
    bus, pics = initialised_pics(mask1=0xFF)
    pics.raise_irq(0)
    assert not pics.pending() and irr_isr(bus, 0x20) == (0x01, 0)
    bus.write(0x21, 1, 0xFE)
    assert pics.pending() and pics.acknowledge() == 0x20
    assert irr_isr(bus, 0x20) == (0, 0x01)


def test_pic_eoi_reopens_the_line_and_priority_orders_requests():
    bus, pics = initialised_pics()
    pics.raise_irq(1)
    pics.raise_irq(3)
    assert pics.acknowledge() == 0x21                 # IRQ 1 outranks IRQ 3
    assert not pics.pending()                         # IRQ 3 waits behind IRQ 1 in service
    pics.raise_irq(0)
    assert pics.acknowledge() == 0x20                 # IRQ 0 nests inside IRQ 1
    pics.raise_irq(0)
    assert not pics.pending()                         # same line: not until its EOI
    bus.write(0x20, 1, 0x20)                          # non-specific EOI: IRQ 0
    assert pics.acknowledge() == 0x20
    bus.write(0x20, 1, 0x61)                          # specific EOI: IRQ 1
    assert irr_isr(bus, 0x20) == (0x08, 0x01)


def test_pic_cascade_through_irq2():
    bus, pics = initialised_pics()
    pics.raise_irq(12)
    assert irr_isr(bus, 0x20)[0] == 0x04 and irr_isr(bus, 0xA0)[0] == 0x10
    assert pics.acknowledge() == 0x28 + 4
    assert irr_isr(bus, 0x20) == (0, 0x04) and irr_isr(bus, 0xA0) == (0, 0x10)
    bus.write(0xA1, 1, 0x10)                          # masked at the slave: no cascade request
    pics.raise_irq(12)
    assert not pics.pending() and irr_isr(bus, 0x20)[0] == 0


def test_pic_rotation_auto_eoi_and_single_mode():
    bus, pics = initialised_pics()
    pics.raise_irq(0)
    pics.acknowledge()
    bus.write(0x20, 1, 0xA0)                          # rotate on non-specific EOI: IRQ 0 now lowest
    pics.raise_irq(0)
    pics.raise_irq(5)
    assert pics.acknowledge() == 0x25
    bus, pics = initialised_pics(icw4=3)              # auto-EOI
    pics.raise_irq(0)
    assert pics.acknowledge() == 0x20 and pics.master.isr == 0
    bus = IoBus()
    pics = PicPair()
    pics.attach(bus)
    for value in (0x13, 0x48, 0x01, 0xF0):            # single: no ICW3, so ICW4 then the mask
        bus.write(0x20 if value == 0x13 else 0x21, 1, value)
    assert pics.master.vector_base == 0x48 and pics.master.imr == 0xF0


def test_unassigned_ports_read_all_ones_and_no_local_apic(trivial):
    vm = create(load_image(trivial["pv"], RAM), "pv", RAM)
    assert vm.bus.read(0x22, 1) == 0xFF and vm.bus.read(0x44, 2) == 0xFFFF and vm.bus.read(0x43, 1) == 0xFF
    assert not Cpuid().query(1)[3] & (1 << 9)         # leaf 1 EDX.APIC clear: the PIC goes straight to the CPU


# -- what Vcpu.jump relies on (Unicorn 2.1.4, measured) ------------------------------------------

def test_syscall_hook_rip_write_gets_the_syscall_length_added():
    uc = machine(b"\x0f\x05" + HLT)
    uc.mem_write(CODE + 0x100, b"\x90\x90" + b"\x48\xc7\xc1\x07\x00\x00\x00" + HLT)
    uc.hook_add(UC_HOOK_INSN, lambda uc, _: uc.reg_write(U.UC_X86_REG_RIP, CODE + 0x100), None, 1, 0,
                U.UC_X86_INS_SYSCALL)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RCX) == 7 and uc.reg_read(U.UC_X86_REG_RIP) == CODE + 0x10A


def test_port_hook_cannot_redirect_and_stops_only_at_a_block_end():
    uc = machine(b"\xe6\x80" + b"\x48\xff\xc3" + b"\xeb\xfb")     # out; inc rbx; jmp back to the inc
    uc.hook_add(UC_HOOK_INSN, lambda uc, *a: (uc.reg_write(U.UC_X86_REG_RIP, CODE + 0x100), uc.emu_stop()),
                None, 1, 0, U.UC_X86_INS_OUT)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RIP) == CODE + 2 and uc.reg_read(U.UC_X86_REG_RBX) == 1


def test_code_hook_redirect_then_stop_stops_at_the_new_rip():
    uc = machine(b"\xfa\x48\xc7\xc3\x01\x00\x00\x00" + HLT)          # cli; mov rbx, 1
    uc.hook_add(UC_HOOK_CODE, lambda uc, a, s, _: (uc.reg_write(U.UC_X86_REG_RIP, a + s), uc.emu_stop()),
                None, CODE, CODE)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RIP) == CODE + 1 and uc.reg_read(U.UC_X86_REG_RBX) == 0


LOOP_ADD = (b"\x48\x83\x04\x25\x00\x00\x40\x01\x01"   # add qword [0x1400000], 1
            b"\x48\xff\xc1" + b"\xeb\xf2")                 # inc rcx; jmp back


def extra_adds(uc) -> int:
    """Adds done beyond the loop's count of them (stopped between add and inc: one is due)."""
    added = struct.unpack("<Q", uc.mem_read(0x1400000, 8))[0]
    return added - uc.reg_read(U.UC_X86_REG_RCX) - (uc.reg_read(U.UC_X86_REG_RIP) == CODE + 9)


def test_a_stop_from_another_thread_can_run_a_memory_add_twice():
    """Why slices are counted, not timed: an asynchronous emu_stop (emu_start's own timeout
    is one) sometimes leaves RIP at an instruction whose store already happened."""
    uc = machine(LOOP_ADD)
    stops, done = [0], threading.Event()

    def stopper():
        while not done.wait(0.0005):
            uc.emu_stop()
            stops[0] += 1
    thread = threading.Thread(target=stopper)
    thread.start()
    try:
        rip = CODE
        while stops[0] < 300:
            uc.emu_start(rip, END)
            rip = uc.reg_read(U.UC_X86_REG_RIP)
    finally:
        done.set()
        thread.join()
    assert extra_adds(uc) > 0


def test_counted_slices_stop_exactly():
    uc = machine(LOOP_ADD)
    rip = CODE
    for _ in range(1000):
        uc.emu_start(rip, END, count=7)
        rip = uc.reg_read(U.UC_X86_REG_RIP)
    assert extra_adds(uc) == 0 and uc.reg_read(U.UC_X86_REG_RCX) == 7000 // 3


def test_hlt_with_interrupts_on_ends_emulation_just_after_it():
    uc = machine(b"\xfb" + HLT + b"\x48\xc7\xc3\x01\x00\x00\x00" + HLT)
    uc.emu_start(CODE, END)
    assert uc.reg_read(U.UC_X86_REG_RIP) == CODE + 2 and uc.reg_read(U.UC_X86_REG_RBX) == 0


# -- delivery on a machine driven by hand ----------------------------------------------------------

TRIVIAL = "fn kmain() -> u64 {\n    putc('x');\n    return 0;\n}\n"
IDT, STACK = 0x1800000, 0x1700008          # in the free 16-64 MiB; the stack deliberately unaligned
# The handler: _start of the PV build (its first bundle, after the hypercall page), so an instruction
# start as rule R8 wants in pv mode; the native modes take any canonical address.
HANDLER = abi.LOAD_BASE + abi.PAGE_SIZE


@pytest.fixture(scope="module")
def trivial(tmp_path_factory) -> dict[str, bytes]:
    """A kernel that only prints: its PV build has batched sites (the UART writes)."""
    folder = tmp_path_factory.mktemp("trivial")
    return {target: build(folder, "trivial", TRIVIAL, target) for target in ("native", "pv")}


def gate(handler: int = HANDLER, kind: int = 0x8E, selector: int = 0x08, ist: int = 0) -> bytes:
    return struct.pack("<HHBBHII", handler & 0xFFFF, selector, ist, kind, (handler >> 16) & 0xFFFF,
                       handler >> 32, 0)


@pytest.fixture
def ready(trivial):
    return lambda mode, gates=None, limit=0xFFF: machine_with_a_tick(trivial, mode, gates, limit)


def deliver(vm: Vm) -> bool:
    """The run loop's delivery step, outside any hook (registers written back after it)."""
    got = vm.run.deliver_events()
    vm.cpu.regs.finish()
    return got


def call(vm: Vm, fn, *args):
    """An exit handler called directly, as a hook would (registers written back after it)."""
    vm.cpu.regs.begin_exit()
    try:
        return fn(vm, *args)
    finally:
        vm.cpu.regs.finish()


def machine_with_a_tick(images: dict[str, bytes], mode: str, gates: bytes | None, limit: int) -> Vm:
    """A machine whose guest has an IDT with gate 32, the PICs remapped with IRQ 0 open, and IRQ 0 raised."""
    vm = create(load_image(images["pv" if mode == "pv" else "native"], RAM), mode, RAM)
    vm.mem.write(IDT + 32 * 16, gates if gates is not None else gate())
    vm.cpu.load_table("idt", limit, IDT, vm.mmu.read_virt)
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 4), (0x21, 1), (0x21, 0xFE)):
        vm.bus.write(port, 1, value)
    vm.engine.uc.reg_write(U.UC_X86_REG_RSP, STACK)
    vm.pics.raise_irq(0)
    return vm


def reg(vm: Vm, name: str) -> int:
    return vm.engine.uc.reg_read(getattr(U, f"UC_X86_REG_{name}"))


def shared(vm: Vm, offset: int) -> int:
    return vm.mem.read(abi.SHARED_PAGE + offset, 1)[0]


ARITHMETIC = 0x1 | 0x4 | 0x40 | 0x80       # kept by an entry, which clears only flags RFLAGS stores as such


def frame_at(vm: Vm, rsp: int) -> tuple[int, ...]:
    return struct.unpack("<5Q", vm.mem.read(rsp, 40))


@pytest.mark.parametrize("mode", ["bare", "trap"])
def test_native_delivery_waits_for_if_then_pushes_a_hardware_frame(mode, ready):
    vm = ready(mode)
    rip = reg(vm, "RIP")
    assert not deliver(vm) and reg(vm, "RIP") == rip        # boot: IF clear
    vm.engine.uc.reg_write(U.UC_X86_REG_RFLAGS, 0x202 | 0x100 | ARITHMETIC)    # IF, TF, CF PF ZF SF
    assert deliver(vm)
    rsp = reg(vm, "RSP")
    assert rsp == (STACK & ~0xF) - 40 and reg(vm, "RIP") == HANDLER
    assert frame_at(vm, rsp) == (rip, 0x08, 0x302 | ARITHMETIC, STACK, 0x10)
    assert reg(vm, "RFLAGS") & (IF | 0x100 | ARITHMETIC) == ARITHMETIC   # interrupt gate: IF and TF off
    assert vm.stats.exits["interrupt 32"] == 1 and vm.pics.master.isr == 1


def test_trap_gate_leaves_if_set(ready):
    vm = ready("trap", gate(kind=0x8F))
    vm.engine.uc.reg_write(U.UC_X86_REG_RFLAGS, 0x202)
    assert deliver(vm) and reg(vm, "RFLAGS") & IF


def test_pv_trap_gate_leaves_the_virtual_if_unmasked(ready):
    """pv: the frame carries the virtual IF; a trap gate leaves the mask as it was, the real IF stays clear."""
    vm = ready("pv", gate(kind=0x8F))
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    rip = reg(vm, "RIP")
    assert deliver(vm)
    assert frame_at(vm, reg(vm, "RSP")) == (rip, 0x08, 0x202, STACK, 0x10)
    assert shared(vm, abi.SH_UPCALL_MASK) == 0 and not reg(vm, "RFLAGS") & IF


def test_upcall_waits_behind_the_mask_with_pending_set_then_arrives(ready):
    vm = ready("pv")
    rip = reg(vm, "RIP")
    assert shared(vm, abi.SH_UPCALL_MASK) == 1
    assert not deliver(vm) and shared(vm, abi.SH_UPCALL_PENDING) == 1
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")             # what `sti` becomes
    assert deliver(vm)
    rsp = reg(vm, "RSP")
    assert reg(vm, "RIP") == HANDLER and frame_at(vm, rsp) == (rip, 0x08, 0x202, STACK, 0x10)
    assert shared(vm, abi.SH_UPCALL_MASK) == 1 and shared(vm, abi.SH_UPCALL_PENDING) == 0
    assert vm.stats.exits["upcall 32"] == 1


def test_iret_hypercall_restores_the_frame_and_the_mask_and_delivers_what_waits(ready):
    vm = ready("pv")
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    rip = reg(vm, "RIP")
    deliver(vm)
    # What the iret entry does before its syscall: push rcx, r11, rax (their values come back).
    rsp = reg(vm, "RSP") - 24
    vm.mmu.write_virt(rsp, struct.pack("<3Q", 0x5555, 0x7777, 0x6666))
    vm.engine.uc.reg_write(U.UC_X86_REG_RSP, rsp)
    vm.engine.uc.reg_write(U.UC_X86_REG_RAX, abi.HC_IRET)
    assert call(vm, hypercalls.iret) is None                                   # no result: rax is the guest's
    assert (reg(vm, "RIP"), reg(vm, "RSP")) == (rip, STACK)
    assert (reg(vm, "RAX"), reg(vm, "R11"), reg(vm, "RCX")) == (0x5555, 0x7777, 0x6666)
    assert shared(vm, abi.SH_UPCALL_MASK) == 0 and not reg(vm, "RFLAGS") & IF
    vm.bus.write(0x20, 1, 0x20)                                          # EOI, and a new tick waiting
    vm.pics.raise_irq(0)
    assert deliver(vm) and reg(vm, "RIP") == HANDLER


@pytest.mark.parametrize("mode", ["trap", "pv"])
@pytest.mark.parametrize("frame,expect", [
    ((0x100000, 0x18, 0x202, STACK, 0x10), "CS 0x18 is neither the code segment 0x8"),
    ((0x100000, 0x23, 0x202, STACK, 0x10), "CS 0x23 is neither the code segment 0x8"),   # user CS, kernel SS
    ((0x100000, 0x08, 0x202, STACK, 0x2B), "SS 0x2b is not the stack segment 0x10"),
    ((1 << 63, 0x08, 0x202, STACK, 0x10), "RIP 0x8000000000000000 is not canonical"),
    ((0x100000, 0x08, 0x202, 1 << 50, 0x10), "RSP 0x4000000000000 is not canonical"),
    (None, "iret: cannot read the frame at rsp 0x80000000"),
])
def test_bad_iret_frames_are_clear_faults(mode, frame, expect, ready):
    vm = ready(mode)
    if frame is None:
        vm.engine.uc.reg_write(U.UC_X86_REG_RSP, 0x80000000)                   # not mapped
    else:
        vm.mem.write(STACK, struct.pack("<5Q", *frame))
    with pytest.raises(GuestFault, match=re.escape(expect)):
        call(vm, delivery.iret)


@pytest.mark.parametrize("gates,limit,expect", [
    (gate(), 0, "vector 32 lies beyond the IDT limit 0x0"),
    (gate(kind=0x0E), 0xFFF, "gate 32 of the IDT at 0x1800000 is not present"),
    (gate(kind=0x8C), 0xFFF, "gate 32 has type 0xc, not a 64-bit interrupt or trap gate"),
    (gate(ist=1), 0xFFF, "asks for IST stack 1"),
    (gate(selector=0x10), 0xFFF, "selector 0x10 is not the kernel code segment 0x8"),
    (gate(handler=1 << 47), 0xFFF, "handler 0x800000000000 is not canonical"),
])
@pytest.mark.parametrize("mode", MODES)
def test_bad_trap_tables_are_clear_faults(mode, gates, limit, expect, ready):
    vm = ready(mode, gates, limit)
    vm.engine.uc.reg_write(U.UC_X86_REG_RFLAGS, 0x202)
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    kind = "upcall" if mode == "pv" else "interrupt"
    with pytest.raises(GuestFault, match=f"^{kind} 32: .*" + re.escape(expect)):
        deliver(vm)


@pytest.mark.parametrize("rsp,expect", [
    (0x80000000, "iret: the saved registers at 0x80000000 cannot be read"),
    (RAM - 24, f"iret: cannot read the frame at rsp {RAM:#x}"),           # the saved ones can: the frame cannot
])
def test_an_iret_hypercall_says_which_part_of_its_stack_cannot_be_read(rsp, expect, ready):
    vm = ready("pv")
    vm.engine.uc.reg_write(U.UC_X86_REG_RSP, rsp)
    with pytest.raises(GuestFault, match=re.escape(expect)):
        call(vm, hypercalls.iret)


def test_a_system_call_entry_is_checked_again_when_it_changes(ready):
    """Rule R8 for LSTAR: checked once per value, so a new value is checked again."""
    vm = ready("pv")
    vm.msrs.write(LSTAR, HANDLER)
    assert vm.mode.syscall_entry(vm) == HANDLER
    vm.msrs.write(LSTAR, HANDLER + 2)
    with pytest.raises(GuestFault, match=r"system-call entry: 0x101002 is not an instruction start .*\(rule R8\)"):
        vm.mode.syscall_entry(vm)


def test_pv_sends_the_guest_only_to_instruction_starts(ready):
    """Rule R8: an upcall gate, and an iret's return address, must be instruction starts the validator saw
    (0x101002 is inside _start's second instruction)."""
    vm = ready("pv", gate(handler=HANDLER + 2))
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    with pytest.raises(GuestFault, match=r"^upcall 32: gate 32: 0x101002 is not an instruction start .*\(rule R8\)"):
        deliver(vm)
    vm = ready("pv")
    vm.mem.write(STACK, struct.pack("<5Q", HANDLER + 2, 0x08, 0x202, STACK, 0x10))
    vm.engine.uc.reg_write(U.UC_X86_REG_RSP, STACK)
    with pytest.raises(GuestFault, match=r"^iret: 0x101002 is not an instruction start .*\(rule R8\)"):
        call(vm, delivery.iret)


def test_a_frame_that_cannot_be_pushed_is_a_fault(ready):
    vm = ready("trap")
    vm.engine.uc.reg_write(U.UC_X86_REG_RFLAGS, 0x202)
    vm.engine.uc.reg_write(U.UC_X86_REG_RSP, abi.START_INFO + 0x800)           # read-only to the guest
    with pytest.raises(GuestFault, match="^interrupt 32: cannot push the interrupt frame at 0x17d8"):
        deliver(vm)


def test_block_skips_the_clock_to_the_tick_and_faults_when_nothing_can_wake(ready):
    vm = ready("pv")
    vm.bus.write(0x20, 1, 0x20)
    vm.pics.master.irr = 0                                               # nothing pending
    with pytest.raises(GuestFault, match="halted with interrupts disabled and nothing pending"):
        call(vm, hypercalls.block)
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    with pytest.raises(GuestFault, match="blocked forever: .* no timer is armed"):
        call(vm, hypercalls.block)
    for port, value in ((0x43, 0x34), (0x40, 0xA9), (0x40, 0x04)):        # 1193: about 1 ms
        vm.bus.write(port, 1, value)
    vm.bus.write(0x21, 1, 0xFF)                                         # ... but IRQ 0 masked
    with pytest.raises(GuestFault, match="blocked forever"):
        call(vm, hypercalls.block)
    vm.bus.write(0x21, 1, 0xFE)
    start, deadline = vm.clock.ticks, vm.clock.next_deadline
    assert call(vm, hypercalls.block) == 0
    assert vm.clock.ticks == deadline == start + -(-1193 * 10**9 // PIT_HZ)
    assert vm.pics.pending() and vm.stats.idle_skips == 1
    assert deliver(vm)
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\1")
    vm.pics.master.isr = 0
    vm.pics.raise_irq(0)
    assert call(vm, hypercalls.block) == 0 and vm.clock.ticks == deadline     # masked but pending: returns


def test_set_timer_is_a_one_shot_on_irq0(ready):
    vm = ready("pv")
    vm.pics.master.irr = 0
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    now = vm.clock.ticks
    assert call(vm, hypercalls.set_timer, now + 50_000) == 0
    call(vm, hypercalls.block)
    assert vm.clock.ticks == now + 50_000 and vm.pics.master.irr == 1
    assert deliver(vm)
    vm.bus.write(0x20, 1, 0x20)
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    with pytest.raises(GuestFault, match="blocked forever"):              # it fired once, and only once
        call(vm, hypercalls.block)
    call(vm, hypercalls.set_timer, now + 10**9)
    call(vm, hypercalls.set_timer, 0)                                          # cancelled
    with pytest.raises(GuestFault, match="blocked forever"):
        call(vm, hypercalls.block)
    call(vm, hypercalls.set_timer, 1)                                          # already passed: at once
    assert vm.pics.pending()


def batched_site(vm: Vm) -> abi.Site:
    return next(s for s in vm.image.info.sites if "batched" in s.becomes)


def test_upcall_waits_while_the_guest_is_inside_a_batched_site(ready):
    vm = ready("pv")
    outside = reg(vm, "RIP")                                             # the entry point
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    site = batched_site(vm)
    vm.engine.uc.reg_write(U.UC_X86_REG_RIP, site.address + site.length - 1)
    assert not deliver(vm) and vm.stats.deferred == 1
    # in the hypercall page, called from inside the site (the queue was full)
    vm.engine.uc.reg_write(U.UC_X86_REG_RIP, vm.image.hypercall_page + abi.HC_MULTICALL * 32 + 7)
    vm.mem.write_u64(STACK, site.address + 5)
    assert not deliver(vm) and vm.stats.deferred == 2
    vm.engine.uc.reg_write(U.UC_X86_REG_RIP, outside)
    assert deliver(vm) and reg(vm, "RIP") == HANDLER


@pytest.mark.parametrize("imr,delivered", [(0xFC, True), (0xFF, False)])
def test_queue_runs_before_an_upcall_and_may_mask_it(imr, delivered, ready):
    vm = ready("pv")
    vm.mem.write(abi.SHARED_PAGE + abi.SH_UPCALL_MASK, b"\0")
    vm.mem.write(abi.SHARED_PAGE + abi.SH_MC_ENTRIES, struct.pack("<5Q", abi.HC_IO_OUT, 0x21, 1, imr, 7))
    vm.mem.write(abi.SHARED_PAGE + abi.SH_MC_COUNT, struct.pack("<I", 1))
    assert deliver(vm) == delivered
    assert vm.pics.master.imr == imr and vm.mem.read(abi.SHARED_PAGE + abi.SH_MC_COUNT, 4) == bytes(4)
    assert shared(vm, abi.SH_UPCALL_PENDING) == 0


# -- whole guests ----------------------------------------------------------------------------------

MASKED = """
var ticks: u64;
var masked: u64;          // 1 while the kernel runs with interrupts off
var bad: u64;             // handler runs that found it so
var sink: u64;

interrupt fn timer() {
    if masked != 0 {
        bad += 1;
    }
    ticks += 1;
    pic_eoi();
}

fn poll(n: u64) {          // exits: virtual time passes, ticks arrive in the PIC
    for i in 0..n {
        timer_pending();
    }
}

fn kmain() -> u64 {
    set_gate(IRQ_BASE, &timer as u64);
    load_idt();
    pic_init(0xfe);
    pit_start(10000);
    sti();
    for round in 0..20 {
        cli();
        masked = 1;
        poll(100);
        if round == 0 {
            for i in 0..SPIN {    // no exits at all: only a slice end stops it
                sink += i;
            }
        }
        masked = 0;
        sti();
        var flags = save_flags();
        cli();
        masked = 1;
        var inner = save_flags();
        cli();
        poll(50);
        restore_flags(inner);
        poll(50);
        masked = 0;
        restore_flags(flags);
        hlt();
    }
    cli();
    pit_stop();
    put_kv("bad", bad);
    put_kv("ticks", ticks);
    return bad;
}
"""


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
def test_no_interrupt_arrives_while_masked(tmp_path, mode):
    result = run_kernel(tmp_path, "masked", "const SPIN: u64 = 3000000;\n" + MASKED, mode)
    got = values(result.console)
    assert result.status == 0 and got["bad"] == 0 and got["ticks"] >= 20
    assert result.stats.exits[f"{'upcall' if mode == 'pv' else 'interrupt'} 32"] == got["ticks"]
    assert result.stats.slices > 0            # the exit-free spin ran out slices while masked
    if mode == "pv":
        assert result.stats.exits["hypercall event_check"] > 0 and result.stats.exits["hypercall iret"] == got["ticks"]


@pytest.mark.parametrize("mode", ["trap", "pv"])
def test_runs_with_exits_and_idling_only_are_deterministic(tmp_path, mode):
    image = build(tmp_path, "masked", "const SPIN: u64 = 0;\n" + MASKED, "pv" if mode == "pv" else "native")
    a, b = (run(image, mode, timeout=60) for _ in range(2))
    assert a.console == b.console and a.stats.exits == b.stats.exits and a.stats.tsc == b.stats.tsc
    assert a.stats.idle_ns == b.stats.idle_ns > 0


IDLE = """
var ticks: u64;

interrupt fn timer() {
    ticks += 1;
    pic_eoi();
}

fn kmain() -> u64 {
    set_gate(IRQ_BASE, &timer as u64);
    load_idt();
    pic_init(0xfe);
    pit_start(50);
    var t0 = rdtsc();
    sti();
    while ticks < 10 {
        hlt();
    }
    cli();
    var t1 = rdtsc();
    pit_stop();
    put_kv("ticks", ticks);
    put_kv("us", (t1 - t0) / 1000);
    return 0;
}
"""


@pytest.mark.parametrize("mode", MODES)
def test_hlt_skips_virtual_time_to_the_next_tick(tmp_path, mode):
    result = run_kernel(tmp_path, "idle", IDLE, mode)
    period = -(-(PIT_HZ // 50) * 10**9 // PIT_HZ)
    assert values(result.console)["ticks"] == 10
    assert result.stats.idle_skips == 10
    assert 10 * period - 200 * EXIT_NS <= result.stats.idle_ns <= 10 * period
    assert result.stats.tsc >= 10 * period
    if mode != "bare":                     # bare reads Unicorn's own TSC
        assert abs(values(result.console)["us"] - 10 * period // 1000) < 200


def test_tasks_kernel_switches_on_ticks_in_pv_with_upcalls(tmp_path):
    image = driver.compile_file(str(ROOT / "kernels" / "tasks.pvk"), "pv")
    result = run(image, "pv", timeout=60)
    assert result.status == 0 and result.console.endswith(b"ticks: 13\ntasks ok\n")
    assert result.stats.exits["upcall 32"] == 13 and result.stats.exits["hypercall block"] == 13


NO_GATE = """
fn kmain() -> u64 {
    load_idt();                       // an IDT with no gate for the timer
    pic_init(0xfe);
    pit_start(1000);
    sti();
    hlt();
    return 0;
}
"""


@pytest.mark.parametrize("mode", MODES)
def test_a_tick_without_a_gate_stops_the_guest_with_one_clear_line(tmp_path, mode):
    result = run(build(tmp_path, "nogate", NO_GATE, "pv" if mode == "pv" else "native"), mode, timeout=60)
    kind = "upcall" if mode == "pv" else "interrupt"
    assert (result.status, result.reason) == (125, "fault")
    assert re.match(rf"guest fault: {kind} 32: gate 32 of the IDT at 0x[0-9a-f]+ is not present at 0x", result.message)
    assert "\n" not in result.message


# -- the interrupt window and sti's shadow ------------------------------------------------------------

SHADOW = """
var flag: u64;
var seen: u64;
var ticks: u64;
interrupt fn timer() {
    if ticks == 0 {
        seen = flag + 1;           // 1: the tick came before the store after sti; 2: after it
    }
    ticks += 1;
    pic_eoi();
}
fn kmain() -> u64 {
    set_gate(IRQ_BASE, &timer as u64);
    load_idt();
    pic_init(0xfe);
    pit_start(1000);
    while !timer_pending() { pause(); }
    sti();
    flag = 1;
    cli();
    pit_stop();
    put_kv("seen", seen);
    put_kv("ticks", ticks);
    return 0;
}
"""


@pytest.mark.parametrize("way", ["bare", "trap", "qemu"])
def test_a_held_tick_arrives_one_instruction_after_sti(tmp_path, way):
    """sti opens interrupts after the instruction that follows it (the store), before the cli."""
    if way == "qemu":
        import qemu
        if not qemu.available():
            pytest.skip(f"{qemu.QEMU} is not installed")
        console, status = qemu.boot(build(tmp_path, "shadow", SHADOW, "native"), timeout=60)
        got = values(console.encode())
        # QEMU's PIT runs on the host's clock: on a busy host a second tick can follow the first
        # before the cli, so only the first one's view is exact there
        assert got["seen"] == 2 and got["ticks"] >= 1
    else:
        got = values(run_kernel(tmp_path, "shadow", SHADOW, way).console)
        assert got == {"seen": 2, "ticks": 1}


def test_bare_opens_the_interrupt_window_only_while_a_tick_is_held(tmp_path):
    """In bare mode sti/popf/iretq exit only while an interrupt waits for IF (none in the window kernel's spins)."""
    result = run(driver.compile_file("kernels/window.pvk", "native"), "bare", timeout=60)
    assert result.reason == "shutdown" and result.status == 0
    assert result.stats.exits["interrupt window"] == 3        # the two sti and the popf that let a tick in

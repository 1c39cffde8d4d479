"""The device model on its own: UART, debug exit, PICs, CPUID, MSRs, the bus, the clock."""
from __future__ import annotations

import struct

import pytest

from pvimage import abi
from runtime.clock import TSC_STEP, VirtualClock
from runtime.devices.bus import IoBus
from runtime.devices.cpuid import Cpuid
from runtime.devices.debug_exit import DebugExit
from runtime.devices.msr import EFER, KERNEL_GS_BASE, MsrFile
from runtime.devices.pic import PicPair
from runtime.devices.uart import COM1, Uart16550
from runtime.engine import Engine
from runtime.errors import Refused, Shutdown


def bus_with_uart():
    out = bytearray()
    bus = IoBus()
    bus.attach(Uart16550(out.extend), COM1, 8)
    return bus, out


def test_uart_transmits_and_reports_transmitter_empty():
    bus, out = bus_with_uart()
    for c in b"hi\n":
        assert bus.read(COM1 + 5, 1) & 0x60 == 0x60
        bus.write(COM1, 1, c)
    assert bytes(out) == b"hi\n"


def test_uart_divisor_latch_does_not_print():
    bus, out = bus_with_uart()
    bus.write(COM1 + 3, 1, 0x80)            # DLAB on
    bus.write(COM1, 1, 0x01)
    bus.write(COM1 + 1, 1, 0x00)
    assert bus.read(COM1, 1) == 1
    bus.write(COM1 + 3, 1, 0x03)            # 8N1, DLAB off
    bus.write(COM1 + 7, 1, 0x5A)            # scratch register keeps its value
    assert bus.read(COM1 + 7, 1) == 0x5A and out == b""


def test_debug_exit_stops_with_the_low_byte():
    with pytest.raises(Shutdown) as e:
        DebugExit().io_write(0xF4, 2, 0x1234)
    assert e.value.status == 0x34


def test_unclaimed_ports_read_all_ones():
    bus = IoBus()
    assert bus.read(0x80, 1) == 0xFF and bus.read(0x80, 2) == 0xFFFF and bus.read(0x80, 4) == 0xFFFFFFFF
    bus.write(0x80, 1, 0x12)                 # ignored, no error


def test_pic_initialisation_and_mask():
    bus = IoBus()
    pics = PicPair()
    pics.attach(bus)
    assert bus.read(0x21, 1) == 0xFF         # masked from reset
    for port, value in ((0x20, 0x11), (0x21, 0x20), (0x21, 0x04), (0x21, 0x01), (0x21, 0xFB)):
        bus.write(port, 1, value)
    assert pics.master.vector_base == 0x20 and pics.master.init_step == 0
    assert bus.read(0x21, 1) == 0xFB
    bus.write(0xA1, 1, 0xFF)
    assert bus.read(0xA1, 1) == 0xFF and bus.read(0x21, 1) == 0xFB


def test_pic_eoi_and_isr_read():
    pics = PicPair()
    pic = pics.master
    pic.isr = 0b101
    pic.io_write(0x20, 1, 0x0B)              # OCW3: read ISR
    assert pic.io_read(0x20, 1) == 0b101
    pic.io_write(0x20, 1, 0x20)              # non-specific EOI clears the lowest bit
    assert pic.isr == 0b100
    pic.io_write(0x20, 1, 0x62)              # specific EOI for line 2
    assert pic.isr == 0


def test_cpuid_vendor_and_hypervisor_leaves():
    cpu = Cpuid()
    eax, ebx, ecx, edx = cpu.query(0)
    vendor = struct.pack("<3I", ebx, edx, ecx)
    assert eax >= 1 and all(0x20 <= c <= 0x7E for c in vendor)
    _, ebx, ecx, edx = cpu.query(0x40000000)
    assert struct.pack("<3I", ebx, ecx, edx).rstrip(b"\0") == b"PVToolHV"
    assert cpu.query(0x40000001)[0] == abi.ABI_VERSION
    assert cpu.query(1)[2] & (1 << 31)       # hypervisor present
    assert cpu.query(0x12345) == (0, 0, 0, 0)


def msr_file():
    return MsrFile(Engine().regs, VirtualClock())


def test_msr_kernel_gs_base_round_trip_and_tsc():
    msrs = msr_file()
    msrs.write(KERNEL_GS_BASE, 0x123456789ABC)
    assert msrs.read(KERNEL_GS_BASE) == 0x123456789ABC
    assert msrs.read(0x10) < msrs.read(0x10)


@pytest.mark.parametrize("msr,value", [(EFER, 0), (EFER, 0xD00 | (1 << 20)), (KERNEL_GS_BASE, 1 << 47),
                                       (0xDEAD, 1), (0x1A0, 0)])
def test_msr_writes_refused(msr, value):
    with pytest.raises(Refused) as e:
        msr_file().write(msr, value)
    assert e.value.errno == abi.EINVAL


def test_msr_unknown_read_refused_and_efer_keeps_long_mode():
    msrs = msr_file()
    with pytest.raises(Refused):
        msrs.read(0xDEAD)
    msrs.write(EFER, 0xD01)                  # adding SCE is fine
    assert msrs.read(EFER) & 0x501 == 0x501


def test_virtual_clock_is_deterministic_and_strictly_increasing():
    a, b = VirtualClock(), VirtualClock()
    reads = [a.read_tsc() for _ in range(5)]
    assert reads == [b.read_tsc() for _ in range(5)]
    assert all(y - x == TSC_STEP for x, y in zip(reads, reads[1:]))
    assert a.now_ns == 5 * TSC_STEP


# -- the phase marker (port 0x80) ---------------------------------------------------------------------

PHASES = """
fn kmain() -> u64 {
    outl(0x80, (100 << 8) | 7);
    for i in 0..100 { wbinvd(); }
    outl(0x80, 0);
    outb(0x80, 9);
    wbinvd();
    outb(0x80, 0);
    return 0;
}
"""


@pytest.mark.parametrize("mode", ["bare", "trap", "pv"])
def test_phase_markers_count_the_work_between_them(tmp_path, mode):
    from pvtool import driver
    from runtime.hypervisor import run
    src = tmp_path / "phases.pvk"
    src.write_text(PHASES)
    result = run(driver.compile_file(str(src), "pv" if mode == "pv" else "native"), mode, timeout=30)
    assert result.status == 0, result.message
    seven, nine = result.stats.phases[7], result.stats.phases[9]
    assert (seven.runs, seven.operations, nine.runs, nine.operations) == (1, 100, 1, 0)
    reason = {"bare": None, "trap": "trap wbinvd", "pv": "hypercall wbinvd"}[mode]
    assert dict(seven.exits) == ({} if reason is None else {reason: 100})     # the markers' own exits are not in
    assert dict(nine.exits) == ({} if reason is None else {reason: 1})
    assert seven.virtual_ns >= 100 * 1000 if reason else seven.virtual_ns >= 0
    assert result.stats.as_dict()["phases"]["7"]["operations"] == 100

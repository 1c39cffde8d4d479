"""gcc-built guests on the hypervisor: every mode, the boot contract, and hostile guests."""
from __future__ import annotations

import re
import struct

import pytest

from pvtool import driver
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ckit.build import build, build_source, have_gcc
from pvimage import abi
from runtime.hypervisor import create, run
from runtime.loader import load_image
from runtime.memory import NONE, R, RW, RX

pytestmark = pytest.mark.skipif(not have_gcc(), reason="gcc is needed to build the test guests")
RAM = 64 << 20


@pytest.fixture(scope="module")
def hello() -> bytes:
    return build("hello_pv").read_bytes()


@pytest.fixture(scope="module")
def native() -> bytes:
    return build("native").read_bytes()


@pytest.fixture(scope="module")
def hostile() -> bytes:
    return build("pv_hostile").read_bytes()


# -- PV ------------------------------------------------------------------------------------

def test_hello_pv_prints_through_console_write_and_the_uart(hello):
    result = run(hello, timeout=10)
    assert (result.status, result.reason, result.message) == (7, "shutdown", "")
    assert result.console == b"hello from a C paravirtual guest\nand hello through the virtual UART\n"
    uart_line = len(b"and hello through the virtual UART\n")
    assert result.stats.exits["hypercall console_write"] == 1
    assert result.stats.exits["hypercall io_out"] == uart_line
    assert result.stats.exits["hypercall shutdown"] == 1


def test_hypercall_error_codes_for_every_hypercall(hostile):
    # This guest checks every result itself, multicall entries' too: it runs lenient.
    result = run(hostile, timeout=10, cmdline="errors", lenient_batches=True)
    assert result.console.startswith(b"errors ok:"), result.console.decode()
    assert result.status == 0


def test_shutdown_keeps_the_low_byte_of_a_wide_status(hostile):
    result = run(hostile, timeout=10, cmdline="shutdown-wide")
    assert (result.status, result.reason) == (0x34, "shutdown")


def test_pv_paging_with_multicall_and_invlpg(hostile):
    result = run(hostile, timeout=10, cmdline="paging")
    assert (result.status, result.console) == (0, b"paging ok\n")
    assert result.stats.batched == {"set_pte": 1, "invlpg": 1}
    assert result.stats.exits["hypercall new_baseptr"] == 2


@pytest.mark.parametrize("scenario,expect", [
    ("pt-direct", "direct write to a live page table at 0x1004028"),
    ("pt-alias", "direct write to a live page table at 0x1004028"),
    ("boot-pt", "direct write to a live page table at 0x3008"),
    ("exec-data", "execution of non-executable guest-physical"),
    ("write-text", "write to read-only guest-physical 0x1"),
    ("write-hypercall-page", "(hypercall page)"),
    ("write-start-info", "(start-info page)"),
    ("block", "halted with interrupts disabled"),
    ("block-unmasked", "blocked forever"),
    ("iret-bad", "iret: bad frame"),
    ("syscall", "syscall outside the hypercall page"),
    ("div0", "divide error (#DE)"),
    ("ud2", "invalid opcode (#UD)"),
    ("unmapped", "page fault (#PF) accessing 0x80000000"),
])
def test_hostile_pv_guest_stops_with_one_clear_line(hostile, scenario, expect):
    result = run(hostile, timeout=10, cmdline=scenario)
    assert (result.status, result.reason) == (125, "fault")
    assert expect in result.message and "\n" not in result.message
    assert result.message.startswith("guest fault: ")


def test_fault_report_names_function_and_source_line(hostile):
    result = run(hostile, timeout=10, cmdline="div0")
    assert re.search(r"at 0x[0-9a-f]+ guest_main\+0x[0-9a-f]+ \(pv_hostile\.c:\d+\)$", result.message)
    result = run(hostile, timeout=10, cmdline="block")       # blamed on the caller, not the stub
    assert "guest_main+" in result.message


def test_runaway_guests_stop_at_the_timeout(hostile):
    for scenario in ("spin", "loop"):
        result = run(hostile, timeout=0.3, cmdline=scenario)
        assert (result.status, result.reason) == (124, "timeout")


def test_max_exits_stops_a_guest(hostile):
    result = run(hostile, timeout=10, cmdline="loop", max_exits=100)
    assert (result.status, result.reason) == (124, "exit-limit")
    assert result.stats.total_exits == 101


IRET_GUEST = r"""
#define PVGUEST_MAIN
#include "pvguest.h"
/* A breakpoint handler that only returns: through the iret entry, with rsp at the CPU's frame. */
__asm__(".text\n.balign 32, 0xcc\nbp_entry:\n    jmp hypercall_page + 32 * 18\n.balign 32, 0xcc\n");
void bp_entry(void);
static u64 idt[2 * 16] __attribute__((aligned(16)));
static struct __attribute__((packed)) { u16 limit; u64 base; } desc;

long guest_main(const struct pv_start_info *si)
{
    u64 at = (u64)bp_entry;
    idt[6] = (at & 0xffff) | (8UL << 16) | (0x8eUL << 40) | ((at >> 16 & 0xffff) << 48);
    idt[7] = at >> 32;
    desc.limit = sizeof idt - 1;
    desc.base = (u64)idt;
    if (PV_HYPERCALL(HC_SET_TRAP_TABLE, (long)&desc, 0, 0, 0, 0))
        return 100;
    u64 rax, rcx, r11;
    __asm__ volatile("mov $0x1111, %%eax\n mov $0x2222, %%ecx\n mov $0x3333, %%r11d\n int3\n"
                     "mov %%rax, %0\n mov %%rcx, %1\n mov %%r11, %2"
                     : "=r"(rax), "=r"(rcx), "=r"(r11) : : "rax", "rcx", "r11", "memory");
    return (rax != 0x1111) | (rcx != 0x2222) << 1 | (r11 != 0x3333) << 2;
}
"""


def test_the_iret_entry_gives_back_rax_rcx_and_r11():
    """The iret entry's own `mov eax` and `syscall` overwrite rax, rcx and r11: it saves them
    first and the hypervisor restores them, so the interrupted code sees what it had."""
    result = run(build_source("iret_saves", IRET_GUEST).read_bytes(), timeout=10)
    assert (result.reason, result.status) == ("shutdown", 0), (result.message, result.status)
    assert result.stats.exits["hypercall iret"] == 1


# -- native: bare and trap --------------------------------------------------------------------

SENSITIVE_OUT = [b"vendor PVToolVCPU64", b"hypervisor PVToolHV", b"irqflags ok", b"tables ok"]


@pytest.mark.parametrize("mode", ["bare", "trap"])
def test_native_guest_runs_in_bare_and_trap(native, mode):
    for cmd, out in (("hello", b"hello from a native guest\n"), ("paging", b"paging ok\n"),
                     ("pic", b"pic masks 0xfb 0xff\n")):
        result = run(native, mode=mode, timeout=10, cmdline=cmd)
        assert (result.status, result.console) == (0, out), result.message
    result = run(native, mode=mode, timeout=10, cmdline="sensitive")
    assert result.status == 0, result.message
    assert result.console.splitlines()[:4] == SENSITIVE_OUT
    assert result.console.endswith(b"sensitive ok\n")


def test_bare_exits_only_for_port_io_and_cpuid(native):
    result = run(native, mode="bare", timeout=10, cmdline="sensitive")
    assert set(result.stats.exits) == {"port I/O in", "port I/O out", "cpuid"}


def test_trap_exits_on_every_sensitive_instruction_and_page_table_write(native):
    result = run(native, mode="trap", timeout=10, cmdline="sensitive")
    for mnemonic in ("cli", "sti", "pushfq", "popfq", "lgdt", "sgdt", "lidt", "sidt", "wrmsr", "rdmsr",
                     "rdtsc", "wbinvd", "cpuid", "in", "out"):
        assert result.stats.exits[f"trap {mnemonic}"] > 0, mnemonic
    paging = run(native, mode="trap", timeout=10, cmdline="paging")
    assert paging.stats.exits["page-table write"] == 1
    assert paging.stats.exits["trap mov to cr3"] == 1 and paging.stats.exits["trap mov from cr3"] == 1
    assert paging.stats.exits["trap invlpg"] == 1


def test_trap_tsc_is_deterministic(native):
    runs = [run(native, mode="trap", timeout=10, cmdline="sensitive").console for _ in range(2)]
    assert runs[0] == runs[1] and b"tsc 0x7d0\n" in runs[0]     # one exit (1 us) + one TSC step (1 us)


@pytest.mark.parametrize("scenario,expect", [
    ("bad-pte", "page-table write refused: PT entry 0x1003 maps hypervisor page 0x1000 writable"),
    ("bad-cr3", "mov cr3, rax refused: page table at 0x7000 is in hypervisor memory"),
    ("cr0-nopg", "turns off protection or paging"),
    ("hlt", "halted with interrupts disabled"),
    ("hlt-sti", "blocked forever"),
])
def test_trap_refusals_and_halts_are_faults(native, scenario, expect):
    result = run(native, mode="trap", timeout=10, cmdline=scenario)
    assert (result.status, result.reason) == (125, "fault")
    assert expect in result.message and ("native.c:" in result.message or "native.h:" in result.message)


def test_trap_leaves_frames_beyond_ram_as_holes(native):
    result = run(native, mode="trap", timeout=10, cmdline="hole")
    assert result.console == b"cr3 ok\n"
    assert "read of guest-physical 0x4001000 (beyond guest RAM of 64 MiB)" in result.message


def test_bare_hlt_with_interrupts_off_is_reported(native):
    result = run(native, mode="bare", timeout=10, cmdline="hlt")
    assert result.status == 125 and "halted with interrupts disabled" in result.message


# -- the boot contract, read back from the machine before it runs ----------------------------------

def test_boot_state_start_info_shared_page_and_low_memory(hello):
    vm = create(load_image(hello, RAM), "pv", RAM, cmdline="quiet")
    info = struct.unpack_from("<8Q", vm.mem.read(abi.START_INFO, 64))
    assert info == (abi.START_INFO_MAGIC, abi.ABI_VERSION, RAM, abi.SHARED_PAGE, vm.image.hypercall_page,
                    abi.BOOT_PML4, abi.BOOT_STACK_TOP, 1)
    assert vm.mem.read(abi.START_INFO + abi.SI_CMDLINE, 6) == b"quiet\0"
    shared = vm.mem.read(abi.SHARED_PAGE, 0x48)
    assert shared[abi.SH_UPCALL_MASK] == 1
    assert struct.unpack_from("<Q", shared, abi.SH_CR3)[0] == abi.BOOT_PML4
    cr0, = struct.unpack_from("<Q", shared, abi.SH_CR0)
    assert cr0 & 0x80000001 == 0x80000001
    assert struct.unpack_from("<HQ", shared, abi.SH_GDTR) == (abi.BOOT_GDT_LIMIT, abi.BOOT_GDT)
    assert vm.cpu.rip == vm.image.entry
    for address, perm in ((0, NONE), (abi.START_INFO, R), (abi.SHARED_PAGE, RW), (abi.BOOT_PML4, R),
                          (abi.BOOT_GDT, R), (0x7000, NONE), (abi.BOOT_STACK_TOP - 8, RW),
                          (abi.BOOT_STACK_TOP, NONE), (vm.image.entry, RX), (abi.FREE_RAM_START, RW)):
        assert vm.mem.effective(address) == perm, hex(address)
    assert set(vm.mmu.tables) == {abi.BOOT_PML4, abi.BOOT_PDPT, abi.BOOT_PD}


# -- nothing crashes the hypervisor ------------------------------------------------------------------

@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(code=st.binary(min_size=1, max_size=64), mode=st.sampled_from(["bare", "trap"]))
def test_random_code_ends_in_a_status_never_an_exception(native, code, mode):
    at = _entry_offset(native)
    data = native[:at] + code + native[at + len(code):]
    try:
        result = run(data, mode=mode, timeout=0.2, max_exits=2000)
    except Exception as e:   # only a refused image may raise, and only with one line
        assert type(e).__name__ == "ImageError" and "\n" not in str(e)
        return
    assert result.status in range(256) or result.status in (124, 125)
    assert "\n" not in result.message


def _entry_offset(data: bytes) -> int:
    """Where the entry point's bytes are in the file."""
    entry, phoff = struct.unpack_from("<QQ", data, 24)
    phnum, = struct.unpack_from("<H", data, 56)
    for k in range(phnum):
        p_type, _, offset, vaddr, _, filesz = struct.unpack_from("<IIQQQQ", data, phoff + 56 * k)
        if p_type == 1 and vaddr <= entry < vaddr + filesz:
            return offset + entry - vaddr
    raise AssertionError("entry point not in a segment")


# -- a bare machine is bare ------------------------------------------------------------------------------------

BOOT_TABLE_STORE = """
fn kmain() -> u64 {
    var pml4 = read_cr3() as *u64;
    pml4[5] = 0;                  // a plain store into the live boot PML4 (an empty slot)
    return 5;
}
"""


@pytest.mark.parametrize("mode", ["bare", "trap"])
def test_a_plain_store_to_the_boot_page_tables_works_as_on_hardware(tmp_path, mode):
    """Bare mode leaves the boot tables writable; trap mode validates the store and performs it."""
    src = tmp_path / "store.pvk"
    src.write_text(BOOT_TABLE_STORE)
    result = run(driver.compile_file(str(src), "native"), mode, timeout=30)
    assert (result.reason, result.status) == ("shutdown", 5), result.message
    assert result.stats.exits.get("page-table write", 0) == (1 if mode == "trap" else 0)

"""The hardware-assisted modes: the exit profiles of VT-x with EPT (`hvm`) and without it (`hvm-shadow`).

Both run unchanged native images (the equivalence test runs every kernel in
them); these tests pin which operations exit and which do not, one rule at a
time, as docs/design.md lists them with their VM-execution controls.
"""
from __future__ import annotations

import pytest

from pvtool import driver
from runtime.hypervisor import run

OPS = """
import "lib/console.pvk";
const PAT: u32 = 0x277;
const KERNEL_GS_BASE: u32 = 0xc0000102;
var cpu: [u32; 4];
fn kmain() -> u64 {
    var f = save_flags();
    cli();
    sti();
    restore_flags(f);
    write_cr3(read_cr3());
    invlpg(0x200000);
    wrmsr(KERNEL_GS_BASE, 0xffff_8000_0000_0000);      // passed through by the MSR bitmap
    var gs = rdmsr(KERNEL_GS_BASE);
    wrmsr(PAT, rdmsr(PAT));                            // exits
    wbinvd();
    cpuid(0, &cpu[0]);
    outb(0x80, 0);
    return 3;
}
"""


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hvm")
    (folder / "lib").symlink_to(driver.__file__.rsplit("/pvtool/", 1)[0] + "/kernels/lib")
    src = folder / "ops.pvk"
    src.write_text(OPS)
    return driver.compile_file(str(src), "native")


def exits(image: bytes, mode: str) -> dict[str, int]:
    result = run(image, mode, timeout=30)
    assert (result.reason, result.status) == ("shutdown", 3), result.message
    return dict(result.stats.exits)


def test_hvm_exits_only_where_vt_x_with_ept_does(image):
    got = exits(image, "hvm")
    assert got == {"RDMSR": 1, "WRMSR": 1, "WBINVD": 1, "CPUID": 1, "I/O instruction": 2}   # 0x80, and the exit port


def test_hvm_shadow_adds_the_exits_of_shadow_paging(image):
    got = exits(image, "hvm-shadow")
    assert got == {"RDMSR": 1, "WRMSR": 1, "WBINVD": 1, "CPUID": 1, "I/O instruction": 2,
                   "CR3 load": 1, "INVLPG": 1}


def test_hvm_shadow_write_protects_guest_page_tables_and_takes_their_writes():
    churn = driver.compile_file("kernels/churn.pvk", "native")
    hvm, shadow = exits_of(churn, "hvm"), exits_of(churn, "hvm-shadow")
    assert "page-table write (shadow)" not in hvm and "CR3 load" not in hvm and "INVLPG" not in hvm
    assert shadow["page-table write (shadow)"] == 8000 and shadow["INVLPG"] == 8000 and shadow["CR3 load"] == 1000


def test_external_interrupts_and_the_interrupt_window_exit_in_hvm():
    window = driver.compile_file("kernels/window.pvk", "native")
    got = exits_of(window, "hvm")
    assert got["external interrupt 32"] == 3 and got["interrupt window"] == 3 and "HLT" not in got


def exits_of(image: bytes, mode: str) -> dict[str, int]:
    result = run(image, mode, timeout=60)
    assert result.reason == "shutdown" and result.status == 0, result.message
    return dict(result.stats.exits)

"""A multicall's run of set_pte entries into one live page table is checked and written in one
pass (runtime/mmu.py, `set_leaves`).  Whatever that pass does not plainly allow goes entry by
entry, so every rule of docs/abi.md section 6 (and R9 of section 8) still holds for each entry of
a run: the entries before a refused one are written, the refused one is not, and the guest stops
naming it (or, lenient, goes on with -errno in its result and the rest of the run written)."""
from __future__ import annotations

import re
import struct

import pytest
import unicorn

from pvimage import abi
from pvtool import driver
from runtime import engine, mmu
from runtime.hypervisor import create, finish, run
from runtime.loader import load_image

KERNEL = """
const PT_BASE: u64 = 0x1000000;
const ALIAS: u64 = 0x40000000;
const RW: u64 = 3;
const HUGE: u64 = 0x80;

fn table(i: u64) -> *u64 { return (PT_BASE + i * 4096) as *u64; }

// Table 0: a 64 MiB identity map in 2 MiB pages; PML4 1, PDPT 2, window PD 3, window PT 4.
fn kmain() -> u64 {
    for t in 0..5 { var p = table(t); for i in 0..512 { p[i] = 0; } }
    for i in 0..32 { set_pte(&table(0)[i], (i << 21) | RW | HUGE); }
    set_pte(&table(3)[0], (table(4) as u64) | RW);
    set_pte(&table(2)[0], (table(0) as u64) | RW);
    set_pte(&table(2)[1], (table(3) as u64) | RW);
    set_pte(&table(1)[0], (table(2) as u64) | RW);
    write_cr3(table(1) as u64);
    var pt = table(4);
    set_pte(&pt[1], 0x1401000 | RW);        // one run of three entries into the live window PT
    set_pte(&pt[2], ENTRY);
    set_pte(&pt[3], 0x1403000 | RW);
    var written: u64 = 0;
    for i in 1..4 { if pt[i] != 0 { written |= 1 << (i - 1); } }
    return written;
}
"""


def image(tmp_path, entry: str) -> bytes:
    src = tmp_path / "run.pvk"
    src.write_text(KERNEL.replace("ENTRY", entry))
    return driver.compile_file(str(src), "pv")


@pytest.mark.parametrize("entry,errno,why", [
    ("0x100000 | 1", "EPERM", "maps executable frames at 0x40002000"),   # the kernel's text, elsewhere
    ("0x10000000000000 | 0x1402000 | RW", "EINVAL", "reserved bits"),
    ("0x6000 | RW", "EPERM", "maps hypervisor page 0x6000 writable"),
])
def test_a_bad_entry_in_a_run_is_refused_alone(tmp_path, entry, errno, why):
    kernel = image(tmp_path, entry)
    result = run(kernel, "pv")
    line = KERNEL.splitlines().index("    set_pte(&pt[2], ENTRY);") + 1
    assert (result.reason, result.status) == ("fault", 125)
    assert re.search(rf"multicall entry \d+ \(set_pte\) refused with -{errno}: ", result.message)
    assert why in result.message and result.message.endswith(f"run.pvk:{line})")
    result = run(kernel, "pv", lenient_batches=True)
    assert (result.reason, result.status) == ("shutdown", 0b101)       # the entries around it are written


@pytest.mark.parametrize("entry", ["0x2000 | RW", "0x7f000 | RW", "0x1402000", "0"])
def test_entries_the_quick_pass_leaves_to_the_exact_one_are_written(tmp_path, entry):
    """The shared page and the boot stack may be mapped writable, a read-only or absent entry
    anywhere: the quick pass leaves some of these to the entry-by-entry rules, which allow them."""
    result = run(image(tmp_path, entry), "pv")
    assert result.reason == "shutdown", result.message
    assert result.status == (0b101 if entry == "0" else 0b111)


def test_after_a_refusal_the_queue_shows_what_ran(tmp_path):
    """Results: 0 for the entries that ran, -errno for the refused one, and the entries after it
    (which never ran) keep what the guest stored in their result field: the code that queued them."""
    vm = create(load_image(image(tmp_path, "0x6000 | RW"), 64 << 20), "pv", 64 << 20)
    result = finish(vm)
    n = int(re.search(r"multicall entry (\d+) ", result.message).group(1))
    entries = list(struct.iter_unpack("<5Q", vm.mem.read(abi.SHARED_PAGE + abi.SH_MC_ENTRIES, (n + 2) * 40)))
    assert [e[0] for e in entries[n - 1:]] == [abi.HC_SET_PTE] * 3
    assert all(e[4] == 0 for e in entries[:n])
    assert entries[n][4] == -abi.EPERM & (1 << 64) - 1
    assert vm.image.info.function_at(entries[n + 1][4])[0].name == "kmain"
    assert vm.mem.read(abi.SHARED_PAGE + abi.SH_MC_COUNT, 4) == bytes(4)


def test_a_run_of_flushes_stops_at_a_non_canonical_one(tmp_path):
    """A run of invlpg entries is checked in one loop, but an entry the hypercall would refuse is refused alone."""
    src = tmp_path / "flush.pvk"
    src.write_text("fn kmain() -> u64 {\n    invlpg(0x1000);\n    invlpg(0x800000000000);\n"
                   "    invlpg(0x2000);\n    return 7;\n}\n")
    kernel = driver.compile_file(str(src), "pv")
    result = run(kernel, "pv")
    assert (result.reason, result.status) == ("fault", 125), result.message
    assert re.search(r"multicall entry 1 \(invlpg\) refused with -EINVAL: invlpg of non-canonical address "
                     r"0x800000000000", result.message)
    result = run(kernel, "pv", lenient_batches=True)
    assert (result.reason, result.status, result.stats.batched["invlpg"]) == ("shutdown", 7, 2)


@pytest.mark.parametrize("pages", [0, 3, mmu.PAGES_FLUSHED_APART + 4])
def test_a_batch_flushes_its_pages_one_by_one_or_all_at_once_when_many(tmp_path, monkeypatch, pages):
    """A page's flush is QEMU's own (a global one empties every translation); past
    PAGES_FLUSHED_APART pages in one multicall, one global flush costs less."""
    if engine.layout().live is None:
        pytest.skip("/proc/self/mem is not readable here: every flush is global")
    flushed, globals_ = [], []
    real_page, real_ctl = engine._tlb_flush_page, unicorn.Uc.ctl
    monkeypatch.setattr(engine, "_tlb_flush_page", lambda cpu, va: (flushed.append(va), real_page(cpu, va)))
    monkeypatch.setattr(unicorn.Uc, "ctl", lambda uc, *a: (globals_.append(a), real_ctl(uc, *a)))
    src = tmp_path / "flush.pvk"
    src.write_text("fn kmain() -> u64 {\n" + "".join(f"    invlpg({0x40_0000 + k * 0x1000 + 8:#x});\n"
                                                     for k in range(pages)) + "    return 7;\n}\n")
    result = run(driver.compile_file(str(src), "pv"), "pv")
    assert (result.reason, result.status, result.stats.batched["invlpg"]) == ("shutdown", 7, pages)
    tlb_flushes = [a for a in globals_ if a[0] == unicorn.UC_CTL_TLB_FLUSH]
    if pages <= mmu.PAGES_FLUSHED_APART:
        assert sorted(flushed) == [0x40_0000 + k * 0x1000 for k in range(pages)] and not tlb_flushes
    else:
        assert flushed == [] and len(tlb_flushes) == 1

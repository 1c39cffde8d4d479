"""Nothing a guest does makes the hypervisor's work or memory unbounded (issue: hostile guests).

- a hierarchy of 4,096 page-table pages, packed or scattered, is validated
  and write-protected in one CR3 load (each table would cost a Unicorn
  region split if protected alone: minutes);
- the leaf-table check done in bulk says exactly what the entry-by-entry
  rules say;
- guest memory keeps the number of Unicorn regions bounded, and a store
  beside a table in a protected granule still lands;
- console output is kept as a bounded tail;
- `--timeout` holds inside long validation work.
"""
from __future__ import annotations

import os
import struct

import pytest
from hypothesis import given, settings, strategies as st

from pvimage import abi
from pvtool import driver
from runtime.console import Console
from runtime.errors import Refused, TimeUp
from runtime.hypervisor import create, run
from runtime.loader import load_image
from runtime.memory import PAGE, RW, W, GuestMemory
from runtime.mmu import Mmu

RAM = 64 << 20

BIG_TABLES = """
// 4,096 page-table pages under one root, written with plain stores while not live, then loaded.
const BASE: u64 = 0x1000000;
const STRIDE: u64 = STRIDE_PAGES;   // pages from one table to the next: 1 packs them, 2 scatters them
const RW: u64 = 0x3;
const HUGE: u64 = 0x80;

fn page(k: u64) -> *u64 {
    return (BASE + k * STRIDE * 4096) as *u64;
}

fn kmain() -> u64 {
    var pml4 = page(0);
    var pdpt = page(1);
    var low = page(2);
    for i in 0..512 {
        pml4[i] = 0;
        pdpt[i] = 0;
        low[i] = (i << 21) | RW | HUGE;
    }
    pml4[0] = (pdpt as u64) | RW;
    pdpt[0] = (low as u64) | RW;
    for d in 0..8 {
        var pd = page(3 + d);
        pdpt[1 + d] = (pd as u64) | RW;
        for e in 0..512 {
            var pt = page(11 + d * 512 + e);
            pd[e] = (pt as u64) | RW;
            for i in 0..512 {
                pt[i] = (0x100000000 + ((e * 512 + i) << 12)) | RW;
            }
        }
    }
    var boot = read_cr3();
    write_cr3(pml4 as u64);
    var pinned = read_cr3() == (pml4 as u64);
    write_cr3(boot);
    if pinned { return 7; }
    return 1;
}
"""


@pytest.mark.slow
@pytest.mark.parametrize("stride", [1, 2], ids=["packed", "scattered"])
@pytest.mark.parametrize("mode", ["pv", "trap"])
def test_a_hierarchy_of_4096_tables_is_validated_and_pinned(tmp_path, mode, stride):
    src = tmp_path / "big.pvk"
    src.write_text(BIG_TABLES.replace("STRIDE_PAGES", str(stride)))
    image = driver.compile_file(str(src), "pv" if mode == "pv" else "native")
    result = run(image, mode, timeout=60)
    assert (result.reason, result.status) == ("shutdown", 7), result.message
    # The hypervisor's own time stays a small fraction of a second per table-heavy load: bounded, not minutes.
    assert result.stats.hypervisor_seconds < 30


# -- the bulk leaf check is the entry-by-entry rule --------------------------------------------------------

def _mmu() -> tuple[GuestMemory, Mmu]:
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    mem = GuestMemory(uc, 4 << 20)
    return mem, Mmu(uc, mem, set_cr3=lambda cr3: None)


ENTRY = st.one_of(
    st.integers(0, (1 << 64) - 1),
    st.builds(lambda frame, flags: frame << 12 | flags, st.integers(0, 1 << 40), st.integers(0, 0xFFF)),
    st.builds(lambda frame, flags: frame << 12 | flags, st.integers(0, 255), st.sampled_from([1, 3, 5, 7])),
    st.just(abi.SHARED_PAGE | 3), st.just(0x10_0000_0000_0003))


@settings(max_examples=150, deadline=None)
@given(st.lists(ENTRY, min_size=1, max_size=512), st.integers(0, 511))
def test_bulk_leaf_check_agrees_with_check_entry(entries, at):
    mem, mmu = _mmu()
    table = 0x200000
    data = [0] * 512
    for k, e in enumerate(entries):
        data[(at + k) % 512] = e
    mem.write(table, struct.pack("<512Q", *data))
    expected = None
    for e in data:
        try:
            mmu.check_entry(1, e)
        except Refused as err:
            expected = err.why
            break
    if expected is None:
        mmu._check_leaf_table(table)
    else:
        with pytest.raises(Refused) as got:
            mmu._check_leaf_table(table)
        assert got.value.why == expected


def test_walk_looks_at_the_clock_while_it_validates():
    mem, mmu = _mmu()
    calls = []

    def time_up():
        calls.append(1)
        raise TimeUp()
    mmu.check_time = time_up
    root, pdpt, pd = 0x100000, 0x101000, 0x102000
    mem.write_u64(root, pdpt | 3)
    mem.write_u64(pdpt, pd | 3)
    for k in range(300):                     # 300 page tables: past one chunk of the walk
        mem.write_u64(pd + 8 * k, (0x200000 + k * PAGE) | 3)
    with pytest.raises(TimeUp):
        mmu.walk(root)
    assert calls == [1]


# -- guest memory: bounded regions, exact where it can be ------------------------------------------------

def test_scattered_guards_rebuild_into_few_regions_and_stores_beside_tables_land():
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    mem = GuestMemory(uc, RAM)
    mem.commit()
    pages = [abi.FREE_RAM_START + 2 * k * PAGE for k in range(1000)]     # every other page
    for page in pages:
        mem.guard(page)
    mem.sync()
    assert mem.rebuilds >= 1 and mem.regions <= 2 * GuestMemory.COARSE_RUNS + 16
    regions = list(uc.mem_regions())
    assert len(regions) == mem.regions
    for page in pages[:50]:                  # every guarded page is write-protected in Unicorn
        assert any(b <= page <= e and not p & W for b, e, p in regions), hex(page)
    beside = pages[0] + PAGE                 # between two tables: protected only by its granule
    assert mem.beside_table(beside) and not mem.beside_table(pages[0])
    assert not mem.beside_table(0x3000)      # the boot tables are the hypervisor's, not "beside" anything
    for page in pages:
        mem.unguard(page)
    mem.sync()
    assert all(p == RW for b, e, p in uc.mem_regions() if b >= abi.FREE_RAM_START)


def test_packed_guards_cost_one_region_split():
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    mem = GuestMemory(uc, RAM)
    mem.commit()
    before = len(list(uc.mem_regions()))
    for k in range(4096):
        mem.guard(abi.FREE_RAM_START + k * PAGE)
    mem.sync()
    assert mem.rebuilds == 0 and len(list(uc.mem_regions())) <= before + 2


def test_protecting_a_page_splits_a_chunk_of_ram_not_all_of_it():
    """Unicorn unmaps and remaps the whole region a protection change cuts: where tables are
    protected, RAM is mapped in chunks, so the first table page costs a chunk's worth."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    for owns_tables in (True, False):
        uc = Uc(UC_ARCH_X86, UC_MODE_64)
        mem = GuestMemory(uc, RAM, hypervisor_owns_tables=owns_tables)
        mem.commit()
        free = [e + 1 - b for b, e, p in uc.mem_regions() if e >= abi.FREE_RAM_START]
        if owns_tables:
            assert max(free) <= RAM // GuestMemory.CHUNKS
            page = abi.FREE_RAM_START + 5 * PAGE
            mem.guard(page)
            mem.sync()
            assert [(b, e) for b, e, p in uc.mem_regions() if not p & W and b >= abi.FREE_RAM_START] == \
                [(page, page + PAGE - 1)]
        else:
            assert len(free) == 1                         # bare: nothing is ever protected


# -- console ---------------------------------------------------------------------------------------------

def test_guest_accesses_within_a_page_go_only_where_the_guest_may():
    """The MMU's one-page fast paths (cached translations with memory's `perm` and `pinned`, and
    GuestMemory.read_if_guest_can, write_if_guest_can) refuse what the general path refuses, and
    write nothing then."""
    vm = create(load_image(driver.compile_file("kernels/hello.pvk", "pv"), RAM), "pv", RAM, timeout=30)
    mmu, mem = vm.mmu, vm.mem
    free = 16 << 20                                     # free RAM, identity-mapped at boot
    mmu.write_virt(free + 8, b"abcdefgh")
    assert mmu.read_virt(free + 8, 8) == b"abcdefgh" and bytes(mem.view[free + 8:free + 16]) == b"abcdefgh"
    mem.pin({free + PAGE})                              # as a live page table is: read-only to the guest
    for va in (free + PAGE, abi.LOAD_BASE, abi.BOOT_PML4, 0):   # a table, code, the hypervisor's
        before = bytes(mem.view[va:va + 8])
        with pytest.raises(Refused):
            mmu.write_virt(va, b"\xff" * 8)
        assert bytes(mem.view[va:va + 8]) == before
    assert mmu.read_virt(free + PAGE, 8) == bytes(8) and mmu.read_virt(abi.LOAD_BASE, 1)
    for _ in range(2):                                  # the second time its translation is cached
        with pytest.raises(Refused):
            mmu.read_virt(0, 8)                         # hypervisor memory
    # a page whose translation is cached changes its permissions: the cached path follows
    page = free + 2 * PAGE
    mmu.write_virt(page, b"before..")
    mem.pin({page})
    with pytest.raises(Refused):
        mmu.write_virt(page, b"pinned..")
    assert bytes(mem.view[page:page + 8]) == b"before.."
    mem.unpin({page})
    mmu.write_virt(page, b"unpinned")
    assert mmu.read_virt(page, 8) == b"unpinned"


def test_console_keeps_a_bounded_tail_and_counts_everything():
    seen = []
    console = Console(seen.append, tail_max=100)
    for k in range(1000):
        console.write(bytes([k % 256]) * 7)
    assert console.total == 7000 and len(console.tail) == 100 and console.truncated
    assert console.tail == b"".join(bytes([k % 256]) * 7 for k in range(1000))[-100:]
    assert sum(map(len, seen)) == 7000


def test_a_console_sink_that_breaks_is_dropped_and_the_guest_goes_on():
    def broken(data: bytes) -> None:
        raise BrokenPipeError(32, "Broken pipe")
    console = Console(broken)
    console.write(b"one")
    console.write(b"two")
    assert console.sink is None and "BrokenPipeError" in console.sink_error and console.tail == b"onetwo"


# -- defence in depth --------------------------------------------------------------------------------------

def test_a_control_register_changed_behind_the_hypervisors_back_stops_the_guest():
    from unicorn import x86_const as U
    image = driver.compile_file("kernels/hello.pvk", "pv")
    vm = create(load_image(image, RAM), "pv", RAM, timeout=30)
    uc = vm.engine.uc
    uc.reg_write(U.UC_X86_REG_CR0, uc.reg_read(U.UC_X86_REG_CR0) ^ (1 << 18))   # AM: as a hidden mov cr0 would
    vm.cpu.regs.invalidate()
    from runtime.hypervisor import finish
    result = finish(vm)
    assert result.reason == "fault" and "CR0 changed behind the hypervisor's back" in result.message


def _resident_mib() -> float:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * PAGE / (1 << 20)


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="needs Linux's /proc/self/statm")
def test_guest_ram_is_resident_only_where_the_guest_touches_it():
    """A machine lives until Python's cyclic collector frees it; RAM resident in full (a zeroed
    buffer) made a test process hold gigabytes of machines already finished."""
    from unicorn import UC_ARCH_X86, UC_MODE_64, Uc
    machines, before = [], _resident_mib()
    for _ in range(4):
        mem = GuestMemory(Uc(UC_ARCH_X86, UC_MODE_64), RAM)
        mem.write(abi.RESERVED_END, b"\x01" * PAGE)              # one page touched
        machines.append(mem)
    assert _resident_mib() - before < RAM >> 20               # four machines: less than one's RAM
    assert all(m.read(abi.RESERVED_END, 2) == b"\x01\x01" and m.read(RAM - 8, 8) == bytes(8) for m in machines)

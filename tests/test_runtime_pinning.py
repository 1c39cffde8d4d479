"""Remembered page-table roots (runtime/mmu.py): switching back to a
hierarchy validated before reuses its validation, yet a guest may still
write a table that is no longer live, as on hardware, and the change is
honoured (and validated) when that root is loaded again."""
from __future__ import annotations

import pytest

from pvtool import driver
from runtime.hypervisor import run

# Constants, table(), and the hierarchies of both spaces, built at the start of kmain: table 0 is the
# low PD both spaces share; space A: PML4 1, PDPT 2, window PD 3, window PT 4 (mapping ALIAS to frame
# 0x1400000); space B: PML4 5, PDPT 6 (no window).
PRELUDE = """const PT_BASE: u64 = 0x1000000;
const ALIAS: u64 = 0x40000000;
const RW: u64 = 3;
const HUGE: u64 = 0x80;

fn table(i: u64) -> *u64 { return (PT_BASE + i * 4096) as *u64; }

"""
SPACES = """    for t in 0..7 { var p = table(t); for i in 0..512 { p[i] = 0; } }
    for i in 0..32 { set_pte(&table(0)[i], (i << 21) | RW | HUGE); }
    set_pte(&table(4)[0], 0x1400000 | RW);
    set_pte(&table(3)[0], (table(4) as u64) | RW);
    set_pte(&table(2)[0], (table(0) as u64) | RW);
    set_pte(&table(2)[1], (table(3) as u64) | RW);
    set_pte(&table(1)[0], (table(2) as u64) | RW);
    set_pte(&table(6)[0], (table(0) as u64) | RW);
    set_pte(&table(5)[0], (table(6) as u64) | RW);
"""

KERNEL = PRELUDE + """
fn kmain() -> u64 {
""" + SPACES + """    *(0x1400000 as *u64) = 11;
    *(0x1401000 as *u64) = 22;

    write_cr3(table(1) as u64);
    var before = *(ALIAS as *u64);
    write_cr3(table(5) as u64);
    table(4)[0] = NEW_ENTRY;          // a direct store into A's window PT, not live now
    write_cr3(table(1) as u64);
    if read_cr3() != table(1) as u64 { return 100; }
    return before * 10 + *(ALIAS as *u64) / 11;
}
"""


def build(tmp_path, entry: str, target: str) -> bytes:
    src = tmp_path / "roots.pvk"
    src.write_text(KERNEL.replace("NEW_ENTRY", entry))
    return driver.compile_file(str(src), target)


@pytest.mark.parametrize("mode", ["bare", "trap", "pv"])
def test_a_table_written_while_not_live_is_honoured_when_its_root_returns(tmp_path, mode):
    image = build(tmp_path, "0x1401000 | RW", "pv" if mode == "pv" else "native")
    result = run(image, mode)
    assert result.reason == "shutdown", result.message
    assert result.status == 11 * 10 + 22 // 11          # 11 before, frame 0x1401000 (22) after
    released = result.stats.exits.get("table page released", 0)
    assert released == (0 if mode == "bare" else 1)    # kept protected after the switch: one fault


def test_a_bad_entry_written_while_not_live_is_refused_when_its_root_returns(tmp_path):
    # Sets a reserved bit in the window's entry: new_baseptr must refuse the root
    # again (re-validated because its bytes changed) and leave B loaded.  The switch
    # is a multicall entry, so the refusal stops the guest at the switch's line ...
    image = build(tmp_path, "0x10000000000000 | 0x1401000 | RW", "pv")
    result = run(image, "pv")
    line = KERNEL.splitlines().index("    if read_cr3() != table(1) as u64 { return 100; }")   # the line above, 1-based
    assert (result.reason, result.status) == ("fault", 125)
    assert "multicall entry 0 (new_baseptr) refused with -EINVAL" in result.message
    assert "reserved bits" in result.message and result.message.endswith(f"roots.pvk:{line})")
    # ... and a lenient run leaves the refusal in the entry and B loaded, which the guest sees.
    result = run(image, "pv", lenient_batches=True)
    assert result.reason == "shutdown", result.message
    assert result.status == 100


STASH = PRELUDE + """
// As above: space A has a window PT (table 4) mapping ALIAS; space B has none.
fn kmain() -> u64 {
""" + SPACES + """
    write_cr3(table(1) as u64);
    set_pte(ALIAS as *u64, 1);              // the hypervisor translates ALIAS: frame 0x1400000
    write_cr3(table(5) as u64);
    set_pte(&table(4)[0], 0x1401000 | RW);  // A's window moves while A is not live
    write_cr3(table(1) as u64);
    set_pte(ALIAS as *u64, 2);              // through the moved window: frame 0x1401000
    write_cr3(table(5) as u64);
    write_cr3(table(1) as u64);             // A again, unchanged: its translations come back
    set_pte((ALIAS + 8) as *u64, 3);
    return *(0x1400000 as *u64) * 64 + *(0x1401000 as *u64) * 8 + *(0x1401008 as *u64);
}
"""


def test_the_hypervisors_translations_leave_and_return_with_their_root(tmp_path):
    """set_pte's pointer is translated through the hypervisor's own TLB, which a root takes along
    when it is left.  A table of A changed while B was live: A's old translation (ALIAS to the
    first frame) must not come back with A, and an unchanged A must translate as before."""
    src = tmp_path / "stash.pvk"
    src.write_text(STASH)
    result = run(driver.compile_file(str(src), "pv"), "pv")
    assert result.reason == "shutdown", result.message
    assert result.status == 1 * 64 + 2 * 8 + 3

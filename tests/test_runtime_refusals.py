"""A page-table update the hypervisor refuses inside a multicall stops the guest, loudly.

Linux on Xen treats a failed batched mmu_update as a bug; so does pvtool by
default: the run ends as a guest fault that names the entry, the operation
and the rule it broke.  `lenient_batches` (`pvtool run --lenient-multicalls`)
keeps the guest running with -errno in the entry's result field instead.
The native build just writes the entry (nothing validates it on bare
hardware).
"""
from __future__ import annotations

import pytest

from pvtool import driver
from runtime.hypervisor import run

KERNEL = """
const TABLE: u64 = 0x1800000;        // a page that is not a live table
fn kmain() -> u64 {
    var pt = TABLE as *u64;
    set_pte(&pt[3], 0x10000000000000 | 0x1400000 | 3);     // bit 52: reserved
    return 9;
}
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    src = tmp_path_factory.mktemp("refused") / "refused.pvk"
    src.write_text(KERNEL)
    return {target: driver.compile_file(str(src), target) for target in ("pv", "native")}


def test_a_refused_batched_update_stops_the_guest_and_says_why(images):
    result = run(images["pv"], "pv", timeout=30)
    assert result.reason == "fault" and result.status == 125
    assert "multicall entry 0 (set_pte) refused with -EINVAL" in result.message
    assert "reserved bits 52-62" in result.message
    assert "refused.pvk:" in result.message         # where in the guest
    assert "\n" not in result.message


def test_lenient_multicalls_let_a_guest_that_checks_results_go_on(images):
    result = run(images["pv"], "pv", timeout=30, lenient_batches=True)
    assert (result.reason, result.status) == ("shutdown", 9)


@pytest.mark.parametrize("mode", ["bare", "trap"])
def test_native_builds_write_a_table_that_is_not_live_unchecked(images, mode):
    result = run(images["native"], mode, timeout=30)
    assert (result.reason, result.status) == ("shutdown", 9), result.message

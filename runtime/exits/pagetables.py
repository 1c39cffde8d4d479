"""Stores that hit a write-protected page: writes to the guest's live page tables.

In pv and trap mode the MMU write-protects every live page-table page at
the guest-physical level (memory.py, mmu.py), so a plain store to one
faults into the hypervisor instead of changing a translation unchecked:

- trap mode: the store is the exit shadow paging takes; the resulting
  entry is validated by the MMU and written, then the CPU's own store
  writes the same bytes.  Stores of up to 8 bytes inside one entry are
  handled (mov, or, cmpxchg ...);
- pv mode: a PV guest updates live tables with set_pte, so the store is a
  fault (docs/abi.md section 6).

In both, a store to a table page that only a remembered, no longer live
hierarchy kept protected releases it (mmu.py, `release`); and a store to a
page protected only because a table shares its granule (when the guest
scatters so many tables that memory.py protects whole granules) is
performed by the hypervisor.  Any other
access that Unicorn refuses is a real fault; its description is kept for
the report (faults.describe_access).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from unicorn import UC_MEM_WRITE_PROT

from ..errors import GuestFault, Refused
from ..memory import page_of

if TYPE_CHECKING:
    from ..machine import Vm

def on_invalid_access(vm: Vm, access: int, address: int, size: int, value: int) -> bool:
    """Unicorn refused an access; True if the hypervisor handled it and the guest goes on."""
    if access == UC_MEM_WRITE_PROT and vm.mode.tracks_tables:
        value &= (1 << 8 * size) - 1 if size <= 8 else -1
        if vm.mmu.release(address, size, value):
            vm.run.count("table page released", vm.cpu.rip)
            return True
        if vm.mem.beside_table(address):
            vm.run.count("write beside a page table", vm.cpu.rip)
            vm.mem.write(address, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
            return True
        level = vm.mmu.tables.get(page_of(address))
        if level is not None:
            if vm.mode.virtual_if:             # pv: tables change only through set_pte
                raise GuestFault(f"direct write to a live page table at {address:#x} (level {level}); "
                                 f"PV guests update page tables with set_pte")
            return shadow_write(vm, address, size, value)
    vm.run.bad_access = (access, address, size)
    return False


def shadow_write(vm: Vm, pa: int, size: int, value: int) -> bool:
    """Trap mode: validate a store into a live page table, the exit shadow paging takes.

    The hypervisor performs the store, validated; returning True lets the
    CPU perform it too, with the same bytes, and go on past it."""
    vm.run.count(vm.mode.exit_name("page-table write"), vm.cpu.rip)
    entry = pa & ~7
    if size > 8 or pa + size > entry + 8:
        raise GuestFault(f"a {size}-byte store at {pa:#x} crosses page-table entries; only whole-entry "
                         f"or narrower stores are emulated")
    shift = 8 * (pa - entry)
    mask = ((1 << 8 * size) - 1) << shift
    new = (vm.mem.read_u64(entry) & ~mask) | (value << shift)
    try:
        vm.mmu.write_entry(entry, new)
    except Refused as e:
        raise GuestFault(f"page-table write refused: {e.why}") from None
    return True

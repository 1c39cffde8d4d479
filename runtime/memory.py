"""Guest RAM: the only memory a guest can reach, with page permissions.

RAM is one Unicorn mapping from guest-physical 0.  Each 4 KiB page carries
permissions (read, write, execute) applied with `uc.mem_protect`.  Unicorn
2.1.4 checks these *physical* permissions on every access the guest makes
through its own page tables, and its invalid-access hooks report the
guest-physical address (found by experiment; see tests/test_runtime_unicorn.py).
So the protection here holds whatever the guest's page tables say:

- text is read+execute and never writable, everything else is not
  executable, so a guest can neither write code nor run data;
- hypervisor pages below 1 MiB are unreachable, except the start-info page
  (read-only), the shared page and the boot stack (read-write), the boot
  page tables and GDT (read-only where the hypervisor tracks page tables,
  read-write on a bare machine);
- live page-table pages are *pinned*: write permission is removed while
  they are reachable from CR3, so a direct store traps.

`read`/`write` are the hypervisor's own bounds-checked accesses; they
ignore permissions.  Guest pointers are checked with `guest_can`.

RAM is a host buffer handed to Unicorn with `mem_map_ptr`: `mem_protect`
on part of a region splits it, and Unicorn copies the whole region's
contents on a split unless it does not own the memory (measured: about
50 ms per split of a 64 MiB `mem_map` region, under 1 ms with
`mem_map_ptr`).  Reads go straight to the buffer, and so do writes to
pages that are not executable: Unicorn holds no translated code for them.
A write touching an executable page goes through `uc.mem_write`, which
drops the translations of code that changes (8 us against well under 1).
"""
from __future__ import annotations

import ctypes
import mmap
import re
import struct
from typing import Callable

from unicorn import UC_PROT_EXEC, UC_PROT_NONE, UC_PROT_READ, UC_PROT_WRITE, Uc

from pvimage import abi

from .errors import Refused

PAGE = abi.PAGE_SIZE
NONE, R, W, X = UC_PROT_NONE, UC_PROT_READ, UC_PROT_WRITE, UC_PROT_EXEC
RW, RX = R | W, R | X

BOOT_TABLES = (abi.BOOT_PML4, abi.BOOT_PDPT, abi.BOOT_PD)
BOOT_STACK = (abi.BOOT_STACK_TOP - abi.BOOT_STACK_SIZE, abi.BOOT_STACK_TOP)



def low_memory(hypervisor_owns_tables: bool) -> list[tuple[int, int, int, str]]:
    """Low memory: (start, end, permissions, what); the rest of [0, 1 MiB) is unreachable.

    Where the hypervisor tracks page tables (pv, trap) the boot tables and GDT
    are read-only to the guest; on a bare machine they are just RAM the
    guest may write, as on hardware."""
    boot = R if hypervisor_owns_tables else RW
    return [
        (abi.START_INFO, abi.START_INFO + PAGE, R, "start-info page"),
        (abi.SHARED_PAGE, abi.SHARED_PAGE + PAGE, RW, "shared page"),
        (abi.BOOT_PML4, abi.BOOT_PD + PAGE, boot, "boot page tables"),
        (abi.BOOT_GDT, abi.BOOT_GDT + PAGE, boot, "boot GDT"),
        (BOOT_STACK[0], BOOT_STACK[1], RW, "boot stack"),
    ]


_U64 = struct.Struct("<Q")


def page_of(pa: int) -> int:
    return pa & ~(PAGE - 1)


_SAME_BYTES = re.compile(rb"(.)\1*", re.S)      # a run of one repeated byte


def _count_runs(data: bytes) -> int:
    """How many runs of equal bytes `data` has (done in C: it may be a million pages)."""
    if not data:
        return 0
    changes = int.from_bytes(data[1:], "little") ^ int.from_bytes(data[:-1], "little")
    diff = changes.to_bytes(len(data) - 1, "little")
    return 1 + len(diff) - diff.count(0)


def _runs(pages, perm_of) -> list[tuple[int, int, int]]:
    """(first, end, permission) for each run of consecutive page numbers with one permission."""
    runs: list[tuple[int, int, int]] = []
    for k in pages:
        perm = perm_of(k)
        if runs and runs[-1][1] == k and runs[-1][2] == perm:
            runs[-1] = (runs[-1][0], k + 1, perm)
        else:
            runs.append((k, k + 1, perm))
    return runs


class GuestMemory:
    def __init__(self, uc: Uc, size: int, hypervisor_owns_tables: bool = True):
        self.uc = uc
        self.size = size
        self.perm = bytearray([RW]) * (size // PAGE)
        self._labels: list[tuple[int, int, str]] = [(0, size, "free RAM")]   # later ones win
        self.pinned: set[int] = set()       # live page tables: read-only to the guest (changed in place:
                                            # the MMU holds it, and `perm`, for its one-page accesses)
        self.guarded: set[int] = set()      # to be write-protected in Unicorn: pinned, or kept (mmu.py)
        self._dirty: set[int] = set()       # page numbers whose protection `sync` must look at
        self._applied = bytearray([RW]) * (size // PAGE)   # what Unicorn enforces, page by page
        self._grain = 1                     # pages per write-protected granule (1: exact)
        self._granules: dict[int, int] = {}  # coarse mode: granule -> guarded pages in it
        self.rebuilds = 0
        self.on_rebuild: Callable[[], None] = lambda: None   # the run loop's: Unicorn stops after a rebuild
        # Anonymous memory, zero pages until touched: only what the guest uses is resident (a zeroed
        # ctypes buffer is resident in full, all of it, for as long as the machine lives)
        self._map = mmap.mmap(-1, size)
        self._ram = (ctypes.c_char * size).from_buffer(self._map)   # lives as long as this object
        self._view = self.view = memoryview(self._map).cast("B")
        chunk = -(-size // self.CHUNKS) + PAGE - 1 & ~(PAGE - 1) if hypervisor_owns_tables else size
        for start in range(0, size, chunk):
            uc.mem_map_ptr(start, min(chunk, size - start), RW, ctypes.addressof(self._ram) + start)
        self.regions = -(-size // chunk)    # Unicorn's regions for RAM, at most (it never merges them)
        self.set_range(0, abi.RESERVED_END, NONE, "hypervisor memory")
        for start, end, perm, what in low_memory(hypervisor_owns_tables):
            self.set_range(start, end, perm, what)

    # -- layout -----------------------------------------------------------------
    def set_range(self, start: int, end: int, perm: int, what: str, merge: bool = False) -> None:
        """Give [start, end) (widened to whole pages) `perm`; `merge` ORs into what is there."""
        first, last = start // PAGE, (end + PAGE - 1) // PAGE
        for k in range(first, last):
            self.perm[k] = self.perm[k] | perm if merge else perm
        self._labels.append((first * PAGE, last * PAGE, what))

    def commit(self) -> None:
        """Apply the layout's page permissions to Unicorn, one call per run of equal pages."""
        for first, last, perm in _runs(range(len(self.perm)), self.perm.__getitem__):
            self.uc.mem_protect(first * PAGE, (last - first) * PAGE, perm)
            self._applied[first:last] = bytes([perm]) * (last - first)
            self.regions += 2

    def what(self, pa: int) -> str:
        return next(w for s, e, w in reversed(self._labels) if s <= pa < e)

    def describe(self, pa: int) -> str:
        if not 0 <= pa < self.size:
            return f"{pa:#x} (beyond guest RAM of {self.size >> 20} MiB)"
        extra = ", a live page table" if page_of(pa) in self.pinned else ""
        return f"{pa:#x} ({self.what(pa)}{extra})"

    # -- write-protecting page tables --------------------------------------------------
    # Unicorn keeps permissions per memory region, and every region it splits
    # off makes the next split dearer (measured with unicorn 2.1.4: 2 ms a
    # split at 250 regions, 80 ms at 4,000), so protecting each table page on
    # its own call would make a guest with thousands of scattered tables cost
    # minutes.  So changes are collected (`guard`, `unguard`) and applied by
    # `sync` in runs of neighbouring pages; and when the regions pile up past
    # EXACT_REGIONS, `_rebuild` maps guest data afresh in as few regions as
    # possible, write-protecting whole aligned granules of pages where there
    # are too many scattered table pages to protect each alone (at most
    # COARSE_RUNS runs).  A store to a page protected only because it shares
    # a granule with a table is performed by the hypervisor (`beside_table`).
    EXACT_REGIONS = 256
    COARSE_RUNS = 48
    # Where page tables are protected, RAM starts as CHUNKS regions, not one:
    # a split unmaps and remaps the whole region it cuts, dropping Unicorn's
    # cached jumps page by page (measured: about 1 ms to protect a page of a
    # 64 MiB region), so protecting a run's first page tables cost
    # milliseconds.  (Not in bare mode: there nothing is ever protected, and
    # more regions make guest accesses a little slower.)
    CHUNKS = 16

    def pin(self, pages: set[int]) -> None:
        """The pages become live tables: read-only to the guest (most are still guarded from before)."""
        self.pinned |= pages
        for page in pages - self.guarded:
            self.guard(page)

    def unpin(self, pages: set[int]) -> None:
        """The pages stop being live tables; they stay write-protected in
        Unicorn until `unguard` (a write then faults once)."""
        self.pinned -= pages

    def guard(self, page: int) -> None:
        if page not in self.guarded:
            self.guarded.add(page)
            self._dirty.add(page // PAGE)

    def unguard(self, page: int) -> None:
        if page in self.guarded:
            self.guarded.discard(page)
            self._dirty.add(page // PAGE)

    def _wanted(self, k: int) -> int:
        """The permission Unicorn should enforce on page k."""
        if self._grain == 1:
            guarded = k * PAGE in self.guarded
        else:
            guarded = self._granules.get(k // self._grain, 0) > 0
        return self.perm[k] & ~W if guarded else self.perm[k]

    def sync(self) -> None:
        """Make Unicorn enforce what `guard`/`unguard` asked for."""
        if not self._dirty:
            return
        if self._grain > 1:
            self._recount_granules()
        changed = sorted(k for k in self._expand(self._dirty) if self._wanted(k) != self._applied[k])
        self._dirty.clear()
        runs = _runs(changed, self._wanted)
        if self.regions + 2 * len(runs) > self.EXACT_REGIONS:
            self._rebuild()
            return
        for first, last, perm in runs:
            self.uc.mem_protect(first * PAGE, (last - first) * PAGE, perm)
            self._applied[first:last] = bytes([perm]) * (last - first)
            self.regions += 2

    def _expand(self, pages: set[int]) -> set[int]:
        """Coarse mode: a change to one page can change its whole granule."""
        if self._grain == 1:
            return pages
        grain = self._grain
        return {k for g in {p // grain for p in pages}
                for k in range(g * grain, min((g + 1) * grain, len(self.perm)))}

    def _recount_granules(self) -> None:
        counts: dict[int, int] = {}
        for page in self.guarded:
            g = page // PAGE // self._grain
            counts[g] = counts.get(g, 0) + 1
        self._granules = counts

    def _rebuild(self) -> None:
        """Map guest data afresh: exact protection if the runs allow it, else by granules."""
        grain = 1
        while True:
            self._grain = grain
            self._recount_granules()
            wanted = bytearray(self.perm)
            for g in self._granules if grain > 1 else (p // PAGE for p in self.guarded):
                first, last = g * grain, min((g + 1) * grain, len(wanted))
                wanted[first:last] = bytes(x & ~W for x in self.perm[first:last])
            if _count_runs(wanted) <= self.COARSE_RUNS * 2 or grain * PAGE >= self.size:
                break
            grain *= 2
        regions = 0
        for first, last in self._data_spans():       # text is never unmapped: a hook may be running it
            self.uc.mem_unmap(first * PAGE, (last - first) * PAGE)
            for match in _SAME_BYTES.finditer(wanted, first, last):
                k, end = match.span()
                self.uc.mem_map_ptr(k * PAGE, (end - k) * PAGE, wanted[k], ctypes.addressof(self._ram) + k * PAGE)
                regions += 1
        self._applied[:] = wanted
        self.regions = regions + sum(1 for p in self.perm if p & X)
        self.rebuilds += 1
        self.on_rebuild()

    def _data_spans(self) -> list[tuple[int, int]]:
        """Maximal runs of pages that are not executable."""
        executable = bytes(1 if p & X else 0 for p in self.perm)
        return [m.span() for m in _SAME_BYTES.finditer(executable) if executable[m.start()] == 0]

    def beside_table(self, pa: int) -> bool:
        """Is the page write-protected only because a table shares its granule (coarse mode)?"""
        k = pa // PAGE
        return (0 <= k < len(self.perm) and self.perm[k] & W and not self._applied[k] & W
                and page_of(pa) not in self.guarded)

    # -- guest permissions -----------------------------------------------------------
    def effective(self, pa: int) -> int:
        """The permissions the guest has on the page holding `pa` right now."""
        if not 0 <= pa < self.size:
            return NONE
        perm = self.perm[pa // PAGE]
        return perm & ~W if page_of(pa) in self.pinned else perm

    def guest_can(self, pa: int, size: int, perm: int) -> bool:
        if size <= 0 or pa < 0 or pa + size > self.size:
            return size == 0
        if (pa ^ (pa + size - 1)) < PAGE:                 # within one page: the usual case
            return self.effective(pa) & perm == perm
        return all(self.effective(p) & perm == perm for p in range(page_of(pa), pa + size, PAGE))

    # One call for the usual guest access (within one page, plain data) instead of a permission
    # check and a copy in several: the MMU's read_virt and write_virt at every frame they move.
    def read_if_guest_can(self, pa: int, size: int) -> bytes | None:
        """The `size` bytes at `pa` if they lie in one page the guest may read; else None (the
        caller takes the general path, which says what is wrong)."""
        end = pa + size
        if 0 <= pa and end <= self.size and (pa ^ (end - 1)) < PAGE and self.perm[pa // PAGE] & R:
            return bytes(self._view[pa:end])
        return None

    def write_if_guest_can(self, pa: int, data: bytes) -> bool:
        """Store `data` at `pa` if it lies in one page of guest data the guest may write (not
        pinned, not code); else False, nothing written (the caller takes the general path)."""
        end = pa + len(data)
        if 0 <= pa and end <= self.size and (pa ^ (end - 1)) < PAGE and \
                self.perm[pa // PAGE] & (W | X) == W and pa & ~(PAGE - 1) not in self.pinned:
            self._view[pa:end] = data
            return True
        return False

    def base_writable(self, pa: int) -> bool:
        """Whether the page is guest data by layout (pinned or not): where tables may live."""
        return 0 <= pa < self.size and self.perm[pa // PAGE] == RW

    # -- the hypervisor's own access --------------------------------------------------
    def _check(self, pa: int, size: int) -> None:
        if pa < 0 or size < 0 or pa + size > self.size:
            raise Refused(abi.EFAULT, f"guest-physical range {pa:#x}+{size:#x} is outside RAM")

    def read(self, pa: int, size: int) -> bytes:
        self._check(pa, size)
        return bytes(self._view[pa:pa + size])

    def write(self, pa: int, data: bytes) -> None:
        self._check(pa, len(data))
        first, end = pa // PAGE, (pa + len(data) + PAGE - 1) // PAGE
        if self.perm[first] & X if end - first == 1 else any(self.perm[k] & X for k in range(first, end)):
            self.uc.mem_write(pa, bytes(data))
        else:
            self._view[pa:pa + len(data)] = data

    def read_u64(self, pa: int) -> int:
        self._check(pa, 8)
        return _U64.unpack_from(self._view, pa)[0]

    def write_u64(self, pa: int, value: int) -> None:
        if pa & 7 or self.perm[pa // PAGE] & X:      # unaligned or code: the general path
            self.write(pa, _U64.pack(value & (1 << 64) - 1))
            return
        self._check(pa, 8)
        _U64.pack_into(self._view, pa, value & (1 << 64) - 1)

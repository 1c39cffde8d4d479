"""Guest page tables: translation for the hypervisor, validation, live-table tracking.

The guest's own 4-level tables drive Unicorn's MMU (real guest paging).  In
`pv` and `trap` the hypervisor validates every change before it can take
effect, Xen-style:

- a root (CR3) is validated as a whole when loaded: every table reachable
  from it is checked entry by entry, then *pinned* (write-protected at the
  guest-physical level, see memory.py) and the previous root's tables that
  are no longer reachable are released;
- a write to a live table (`set_pte` in pv, a trapped store in trap) is
  checked at the level the table is live at; if it adds or removes a
  subtree the live set is recomputed from the root.

The entry rules (docs/abi.md section 6):

- bits 52-62 must be clear; a PML4 entry cannot be a large page; a large
  page must be aligned (-EINVAL);
- a non-leaf entry must name a table inside RAM (-EINVAL), not in
  hypervisor memory below 1 MiB except the boot tables, and not in text or
  read-only data (-EPERM): a table page must be a page pinning can protect;
- a 4 KiB leaf must not map a hypervisor page below 1 MiB writable, except
  the shared page and the boot stack, which belong to the guest (-EPERM).
  Large leaves may cover low memory (the boot map is one): the pages there
  the guest must not write are protected at the guest-physical level, which
  no page table can change;
- a leaf whose frame lies beyond the end of RAM is accepted as an unbacked
  hole, as on hardware (a kernel's identity map may cover more than the
  machine has): an access through it faults.

A page used as a table at two different levels is refused (-EINVAL).  A
table page written while not live (a hierarchy being built) gets only the
checks that need no level; the rest happen when it becomes live.

In pv mode one more rule keeps the code validator's proof true at run time
(rule R9 of docs/abi.md): a leaf that maps an executable frame (the image's
text, whose bytes and addresses the validator checked) must map it at its
own address (-EPERM).  So the walk knows the virtual address of every
entry, and remembers each table's (`table_vas`) for later writes to it.

Unicorn's TLB caches translations, so `flush` is needed where invlpg
requires it.  A page's flush is QEMU's own, what `invlpg` runs natively
(engine.Engine.flush_page); the API has only a global flush (UC_CTL_TLB_FLUSH,
issued with `uc.ctl`: unicorn 2.1.4's Python binding has no wrapper), which
empties every translation and costs their refills: it is used where the
engine cannot find its CPU object, and for batches of many pages.  Loading
CR3 through the API flushes everything, so a root switch needs no flush of
its own.  No safety rests on these flushes: the guest asks for them, and
what protects the hypervisor (pinning, memory.py) flushes by itself.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Callable, Iterable

from unicorn import UC_CTL_IO_WRITE, UC_CTL_TLB_FLUSH, Uc
from unicorn.x86_const import UC_X86_REG_CR3

from pvimage import abi

from .devices.msr import canonical
from .errors import Refused
from .memory import BOOT_STACK, BOOT_TABLES, PAGE, R, W, X, GuestMemory, page_of

P, RW, PS = 1 << 0, 1 << 1, 1 << 7
ADDR = 0x000F_FFFF_FFFF_F000
RESERVED = 0x7FF0_0000_0000_0000          # bits 52-62
PAT_LARGE = 1 << 12                       # PAT bit of a large-page entry
PAGE_SIZE_AT = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}
WX = W | X                      # a guest store needs W, and never goes into code
LEVEL_NAME = {4: "PML4", 3: "PDPT", 2: "PD", 1: "PT"}
CR3_FLAGS = 0x18                          # PWT, PCD
_ENTRIES = struct.Struct("<512Q")
_U64 = struct.Struct("<Q")
MAX_REMEMBERED_ROOTS = 16
MAX_REMEMBERED_TABLES = 4096            # table pages whose validation is kept, all roots together (16 MiB of copies)
WALK_CHUNK = 256                        # tables validated between two looks at the clock
MAX_PATHS = 1 << 16                     # (table, address) pairs a walk follows
SPAN_AT = {4: 1 << 39, 3: 1 << 30, 2: 1 << 21}   # what one entry of a table at this level covers


@dataclass(slots=True)
class _Remembered:
    """A hierarchy no longer live whose validation is kept (Mmu._remember)."""
    tables: dict[int, int]          # table page -> level
    vas: dict[int, set[int]]        # table page -> the virtual addresses it maps from (R9)
    pages: list[int]                # the table pages, in order
    copy: bytes                     # their bytes when it was left
    tlb: dict[int, int]             # the hypervisor's translations through it (Mmu._tlb) ...
    tlb_tables: set[int]            # ... and the table pages they read


def _canonical(va: int) -> int:
    """A 48-bit address with bit 47 copied up, as the MMU reads it."""
    return va | 0xFFFF_0000_0000_0000 if va & (1 << 47) else va


def _lanes(value: int) -> int:
    """`value` in each of the 512 64-bit lanes of a page."""
    return int.from_bytes(value.to_bytes(8, "little") * 512, "little")


_LANES_P, _LANES_FRAME, _LANES_RESERVED = _lanes(P), _lanes(ADDR), _lanes(RESERVED)
_LANES_ADDR = _lanes(ADDR & ~(abi.RESERVED_END - 1))                # the frame bits from 1 MiB up
_LANES_FILL = _lanes((1 << 52) - abi.RESERVED_END)     # carries into bit 52 iff those bits are not all zero
_LANES_BIT52 = _lanes(1 << 52)
_LANES_INDEX = int.from_bytes(b"".join((k * PAGE).to_bytes(8, "little") for k in range(512)), "little")
_LANES_NONZERO = _lanes((1 << 52) - 1)                    # carries into bit 52 iff a lane is not zero


PAGES_FLUSHED_APART = 16        # more pages in one batch: one global flush costs less
ALL = object()                  # a batch's deferred flush that must empty the whole TLB


class _Batch:
    def __init__(self, mmu: Mmu):
        self.mmu = mmu

    def __enter__(self) -> None:
        self.mmu._flush_deferred = set()

    def __exit__(self, *exc) -> None:
        mmu = self.mmu
        pending, cr3 = mmu._flush_deferred, mmu._cr3_deferred
        mmu._flush_deferred = mmu._cr3_deferred = None
        if cr3 is not None:
            mmu.set_cr3(cr3)             # which flushes Unicorn's TLB too
        elif pending is ALL or len(pending) > PAGES_FLUSHED_APART:
            mmu.flush()
        else:
            for va in pending:
                mmu.flush(va)


def is_leaf(level: int, entry: int) -> bool:
    return level == 1 or (level in (2, 3) and bool(entry & PS))


def links(level: int, entry: int) -> bool:
    """Whether `entry` names a next-level table."""
    return bool(entry & P) and not is_leaf(level, entry)


def guest_low_page(frame: int) -> bool:
    """Pages below 1 MiB that the boot contract gives the guest."""
    return frame == abi.SHARED_PAGE or BOOT_STACK[0] <= frame < BOOT_STACK[1]


class Mmu:
    def __init__(self, uc: Uc, mem: GuestMemory, set_cr3: Callable[[int], None],
                 check_time: Callable[[], None] = lambda: None,
                 identity_frames: list[tuple[int, int]] | None = None,
                 flush_page: Callable[[int], None] | None = None):
        self.uc = uc
        self.flush_page = flush_page         # one page out of Unicorn's TLB (engine.py); None: flush all
        self.mem = mem
        self._view, self._perm, self._pinned, self._ram_end = mem.view, mem.perm, mem.pinned, mem.size
        self.check_time = check_time         # raises if the run's time is up (run.py)
        # pv (R9): guest-physical ranges that may only be mapped at their own address
        self.identity_frames = identity_frames or []
        self.table_vas: dict[int, set[int]] = {}   # live table page -> the virtual addresses it maps from
        self.set_cr3 = set_cr3               # the CPU's half of a root switch (cpu.py)
        self.tables: dict[int, int] = {}     # live table page -> level
        self.root = 0
        # The hypervisor's own TLB for `translate`, kept only while it tracks
        # the tables (not in bare mode).  It is never staler than the tables
        # themselves: a validated write to a table one of its walks went
        # through drops it, and it belongs to the root, so it leaves with the
        # root and comes back only with a remembered root whose tables are
        # byte for byte what they were (see _remember).  So the guest's TLB
        # flushes, which change no table, leave it alone.  Keyed by the page's
        # virtual address plus 1 for a write (an int: no tuple to build).
        self._tlb: dict[int, int] = {}
        self._tlb_tables: set[int] = set()   # table pages the cached walks read
        self._flush_deferred: set[int] | object | None = None   # in a batch: its pages or ALL; None: now
        self._cr3_deferred: int | None = None      # inside a batch: the CR3 to load at its end
        self._roots: dict[int, _Remembered] = {}   # see _remember
        self._orphans: set[int] = set()      # pages of roots forgotten since _unguard_forgotten

    # -- rules ----------------------------------------------------------------------
    def check_table(self, table: int) -> None:
        if table + PAGE > self.mem.size:
            raise Refused(abi.EINVAL, f"page table at {table:#x} is beyond RAM")
        if table < abi.RESERVED_END and table not in BOOT_TABLES:
            raise Refused(abi.EPERM, f"page table at {table:#x} is in hypervisor memory")
        if table not in BOOT_TABLES and not self.mem.base_writable(table):
            raise Refused(abi.EPERM, f"page table at {self.mem.describe(table)} is not in guest data memory")

    def check_entry(self, level: int, entry: int) -> None:
        """Refuse an entry that may not stand at `level` (see the module docstring)."""
        if not entry & P:
            return
        if entry & RESERVED:
            raise Refused(abi.EINVAL, f"{LEVEL_NAME[level]} entry {entry:#x} sets reserved bits 52-62")
        addr = entry & ADDR
        if level == 4 and entry & PS:
            raise Refused(abi.EINVAL, f"PML4 entry {entry:#x} cannot map a page")
        if not is_leaf(level, entry):
            self.check_table(addr)
            return
        size = PAGE_SIZE_AT[level]
        if level > 1 and addr & (size - 1) & ~PAT_LARGE:
            raise Refused(abi.EINVAL, f"{LEVEL_NAME[level]} entry {entry:#x} maps a misaligned large page")
        frame = addr & ~(size - 1)
        if level == 1 and entry & RW and frame < abi.RESERVED_END and not guest_low_page(frame):
            raise Refused(abi.EPERM, f"PT entry {entry:#x} maps hypervisor page {frame:#x} writable")

    def walk(self, root: int) -> dict[int, int]:
        """Validate the hierarchy under `root`; its table pages and their levels (and, in
        `table_vas`, the virtual addresses each one maps from).

        Bounded by the hierarchy's size, itself bounded by RAM (a table reached
        by more paths than MAX_PATHS allows is refused); the caller's
        `check_time` runs every WALK_CHUNK tables so a run's timeout holds
        inside a long validation too."""
        self.check_table(root)
        found: dict[int, int] = {}
        vas: dict[int, set[int]] = {}
        todo = [(root, 4, 0)]
        paths = 0
        while todo:
            table, level, base = todo.pop()
            if table in found and found[table] != level:
                raise Refused(abi.EINVAL, f"page {table:#x} is used as a table at two levels")
            seen = vas.setdefault(table, set())
            if base in seen:
                continue
            paths += 1
            if paths > MAX_PATHS:
                raise Refused(abi.EINVAL, f"page tables shared along more than {MAX_PATHS} paths")
            first = table not in found
            found[table] = level
            seen.add(base)
            if len(found) % WALK_CHUNK == 0 and first:
                self.check_time()
            if level == 1:
                self._check_leaf_table(table, base, rules=first)
                continue
            span = SPAN_AT[level]
            for k, entry in enumerate(_ENTRIES.unpack_from(self.mem.view, table)):
                if entry & P:
                    va = _canonical(base + k * span)
                    if first:
                        self.check_entry(level, entry)
                    if not is_leaf(level, entry):
                        todo.append((entry & ADDR, level - 1, va))
                    elif self.identity_frames:
                        self._check_identity(level, entry, va)
        self.table_vas = vas
        return found

    def _check_identity(self, level: int, entry: int, va: int) -> None:
        """R9: a leaf mapping an executable frame maps it at its own address."""
        size = PAGE_SIZE_AT[level]
        frame = entry & ADDR & ~(size - 1)
        for lo, hi in self.identity_frames:
            if frame < hi and lo < frame + size and va != frame:
                raise Refused(abi.EPERM, f"{LEVEL_NAME[level]} entry {entry:#x} maps executable frames at "
                                         f"{va:#x}, not at their own address (rule R9)")

    def _check_leaf_table(self, table: int, base: int = 0, rules: bool = True) -> None:
        """check_entry (when `rules`) and R9 for all 512 leaves of a page table mapping from `base`, at
        once, as arithmetic on the page read as one 32768-bit number (most of a big hierarchy is
        leaf tables).  Only a table with a suspect entry is then checked entry by entry, for the
        message."""
        x = int.from_bytes(self.mem.view[table:table + PAGE], "little")
        present = (x & _LANES_P) * 0xFFFF_FFFF_FFFF_FFFF      # each present entry's lane all ones
        y = x & present
        suspect = 0
        if rules:
            low = (y & _LANES_ADDR) + _LANES_FILL & _LANES_BIT52    # bit 52: the frame is at or above 1 MiB
            suspect = y & _LANES_RESERVED or (y >> 1) & _LANES_P & ~(low >> 52)
        frames = y & _LANES_FRAME
        for lo, hi in self.identity_frames:
            # per lane: at or above lo, below hi, and not the lane's own address (base + 4 KiB * k)
            at_lo = (frames + _lanes((1 << 52) - lo)) >> 52 & _LANES_P
            at_hi = (frames + _lanes((1 << 52) - hi)) >> 52 & _LANES_P
            moved = (frames ^ (_lanes(base & ADDR) + _LANES_INDEX)) + _LANES_NONZERO >> 52 & _LANES_P
            suspect = suspect or at_lo & ~at_hi & moved & (present & _LANES_P)
        if suspect:
            for k, entry in enumerate(_ENTRIES.unpack_from(self.mem.view, table)):
                if rules:
                    self.check_entry(1, entry)
                if entry & P and self.identity_frames:
                    self._check_identity(1, entry, _canonical(base + k * PAGE))

    # -- changes --------------------------------------------------------------------
    def load_root(self, cr3: int) -> None:
        """Validate, pin and switch to a new root (CR3 load, new_baseptr)."""
        if cr3 & ~(ADDR | CR3_FLAGS):
            raise Refused(abi.EINVAL, f"CR3 value {cr3:#x} sets reserved bits")
        root = cr3 & ADDR
        if root != self.root:
            self._remember(self.root, self.tables)
            kept = self._recall(root)
            if kept is None:
                try:
                    tables = self.walk(root)
                except Refused:
                    self._roots.pop(self.root, None)     # it stays live, so it is not kept
                    raise
                self._drop_tlb()
            else:
                tables, self._tlb, self._tlb_tables = kept.tables, kept.tlb, kept.tlb_tables
            self._repin(tables)
            self.root = root
        # Loading CR3 flushes Unicorn's TLB (tests/test_runtime_unicorn.py).  In a
        # batch the load waits for its end (the hypervisor's own walks use `root`),
        # where it is the batch's one flush.
        if self._flush_deferred is None:
            self.set_cr3(cr3)
        else:
            self._cr3_deferred = cr3

    def adopt_root(self, root: int) -> None:
        """Track and pin the boot hierarchy the hypervisor built itself."""
        self.root = root
        self._repin(self.walk(root))
        self._drop_tlb()

    def set_pte(self, va: int, value: int) -> None:
        """The set_pte hypercall and multicall entry: a validated write of the
        entry at guest-virtual `va` (translated through the cache first: a
        batch writes many entries of one table)."""
        if va & 7:
            raise Refused(abi.EFAULT, f"page-table entry pointer {va:#x} is not 8-byte aligned")
        page = self._tlb.get(va & ~(PAGE - 1))
        self.write_entry(page | (va & (PAGE - 1)) if page is not None else self.translate(va), value)

    def set_leaves(self, va_page: int, writes: list[tuple[int, int]]) -> bool:
        """Many set_pte into one page at once (a multicall's run of them, as u64 values): if that page
        is a live table of 4 KiB leaves and every new entry is plainly allowed (no reserved bits, a
        frame from 1 MiB up, an executable frame only at its own address), write them all and return
        True.  False (nothing written) otherwise: the caller then writes them one by one, which
        refuses exactly (and allows the rare leaf the quick test does not, such as the shared page)."""
        pa_page = self._tlb.get(va_page)
        if pa_page is None:
            try:
                pa_page = self.translate(va_page) & ~(PAGE - 1)
            except Refused:
                return False
        if self.tables.get(pa_page) != 1:
            return False
        identity = self.identity_frames
        bases = self.table_vas.get(pa_page, ()) if identity else ()
        for offset, value in writes:
            if offset & 7:
                return False
            if value & P:
                frame = value & ADDR
                if value & RESERVED or frame < abi.RESERVED_END:
                    return False
                for lo, hi in identity:
                    if lo <= frame < hi and any(_canonical(base + offset // 8 * PAGE) != frame for base in bases):
                        return False
        view = self.mem.view
        for offset, value in writes:
            _U64.pack_into(view, pa_page + offset, value)
        if pa_page in self._tlb_tables:
            self._drop_tlb()
        return True

    def write_entry(self, pa: int, value: int) -> None:
        """A validated page-table write of the u64 at guest-physical `pa`."""
        value &= (1 << 64) - 1
        if pa & 7:
            raise Refused(abi.EFAULT, f"page-table entry pointer {pa:#x} is not 8-byte aligned")
        page = pa & ~(PAGE - 1)
        level = self.tables.get(page)
        if level is None:
            self._write_unpinned(pa, value)
            return
        self.check_entry(level, value)
        if self.identity_frames and is_leaf(level, value) and value & P:
            span = PAGE_SIZE_AT[level]
            for base in self.table_vas.get(page, ()):
                self._check_identity(level, value, _canonical(base + (pa - page) // 8 * span))
        old = self.mem.read_u64(pa) if level > 1 else 0     # a leaf table has no subtrees
        self.mem.write_u64(pa, value)
        if page in self._tlb_tables:
            self._drop_tlb()
        if level > 1 and (links(level, old) or links(level, value)):
            try:
                tables = self.walk(self.root)
            except Refused:
                self.mem.write_u64(pa, old)
                raise
            self._repin(tables)

    def _write_unpinned(self, pa: int, value: int) -> None:
        if not self.mem.guest_can(pa, 8, W):   # guest data only, never text or hypervisor pages
            raise Refused(abi.EFAULT, f"set_pte target {self.mem.describe(pa)} is not guest-writable memory")
        if value & P:
            if value & RESERVED:
                raise Refused(abi.EINVAL, f"entry {value:#x} sets reserved bits 52-62")
        self.mem.write_u64(pa, value)

    # Switching back to a hierarchy validated before is common (one per
    # process), so, like Xen's pinning, its validation is kept.  The
    # hierarchy being left was valid (every write to it while live was
    # validated): keep a copy of its pages, and keep them write-protected in
    # Unicorn.  If they still hold the same bytes when the root is loaded
    # again (a byte comparison, whoever wrote them), the validation still
    # holds and nothing needs re-protecting.  The guest may still write a
    # table that is no longer live: its first store faults, and `release`
    # forgets the roots using that page and performs it.
    def _remember(self, root: int, tables: dict[int, int]) -> None:
        if not tables or len(tables) > MAX_REMEMBERED_TABLES:
            return
        total = sum(len(r.tables) for r in self._roots.values()) + len(tables)
        while self._roots and (len(self._roots) >= MAX_REMEMBERED_ROOTS or total > MAX_REMEMBERED_TABLES):
            total -= len(self._forget(next(iter(self._roots))).tables)
        pages = list(tables)
        self._roots[root] = _Remembered(tables, self.table_vas, pages, self._copy(pages), self._tlb,
                                        self._tlb_tables)

    def _recall(self, root: int) -> _Remembered | None:
        """`root` as it was left, if it is remembered and its tables are unchanged (with its table
        addresses back in `table_vas`, which rule R9 needs for later writes); else None: walk it
        again."""
        kept = self._roots.pop(root, None)
        if kept is None:
            return None
        if self._copy(kept.pages) != kept.copy:
            self._orphans.update(kept.pages)
            return None
        self.table_vas = kept.vas
        return kept

    def _forget(self, root: int) -> _Remembered:
        """Drop a remembered root; its pages stay protected until _unguard_forgotten looks at them."""
        kept = self._roots.pop(root)
        self._orphans.update(kept.pages)
        return kept

    def _copy(self, pages: list[int]) -> bytes:
        view = self.mem.view
        return b"".join([view[page:page + PAGE] for page in pages])

    def release(self, pa: int, size: int, value: int) -> bool:
        """A guest store of `size` bytes hit write-protected `pa`: if only a
        remembered (not live) root kept the page so, forget those roots and
        perform the store (Unicorn drops a store whose fault hook returns
        True, so the hypervisor makes it).  Stores wider than 8 bytes cannot
        be replayed from the hook: they stay faults."""
        page = page_of(pa)
        if page in self.tables or page not in self.mem.guarded or size > 8:
            return False
        for root in [r for r, kept in self._roots.items() if page in kept.tables]:
            self._forget(root)
        self._unguard_forgotten(())
        self.mem.write(pa, (value & ((1 << 8 * size) - 1)).to_bytes(size, "little"))
        self.mem.sync()
        return True

    def _repin(self, tables: dict[int, int]) -> None:
        gone = self.tables.keys() - tables.keys()
        self.mem.unpin(gone)
        self.mem.pin(tables.keys() - self.tables.keys())
        self.tables = tables
        self._unguard_forgotten(gone)
        self.mem.sync()

    def _unguard_forgotten(self, gone: Iterable[int]) -> None:
        """Unprotect the pages that no live or remembered hierarchy holds any longer: of those that
        just stopped being live (`gone`) and those of the roots forgotten since the last look."""
        candidates = (self._orphans.union(gone) & self.mem.guarded) - self.tables.keys()
        self._orphans = set()
        for kept in reversed(self._roots.values()):     # the newest first: the root just left
            if not candidates:
                return
            candidates -= kept.tables.keys()
        for page in candidates:
            self.mem.unguard(page)

    def flush(self, va: int | None = None) -> None:
        """Flush the guest's TLB entry for page `va` (invlpg), or all of it; or note it while a batch runs."""
        deferred = self._flush_deferred
        if deferred is not None:
            if va is None:
                self._flush_deferred = ALL
            elif deferred is not ALL:
                deferred.add(va & ~(PAGE - 1))
            return
        if va is None or self.flush_page is None:
            self.uc.ctl(UC_CTL_TLB_FLUSH, UC_CTL_IO_WRITE)
        else:
            self.flush_page(va)

    def batch(self) -> "_Batch":
        """`with mmu.batch():` flushes at the end, for a multicall (and loads CR3
        there): no guest instruction runs in between, so flushing the pages
        asked for then (or all, past PAGES_FLUSHED_APART) is as good as at once."""
        return _Batch(self)

    def _drop_tlb(self) -> None:
        # new objects, not cleared ones: a remembered root may hold the old ones
        self._tlb = {}
        self._tlb_tables = set()

    # -- translation for the hypervisor ----------------------------------------------
    def translate(self, va: int, write: bool = False) -> int:
        """Guest-virtual to guest-physical through the current CR3, or Refused(EFAULT)."""
        hit = self._tlb.get(va & ~(PAGE - 1) | write)
        if hit is not None:
            return hit | (va & (PAGE - 1))
        if not canonical(va):
            raise Refused(abi.EFAULT, f"non-canonical address {va:#x}")
        path: list[int] = []
        pa = self._walk_to(va, write, path)
        if self.tables:
            if len(self._tlb) > 4096:
                self._drop_tlb()
            self._tlb[va & ~(PAGE - 1) | write] = page_of(pa)
            self._tlb_tables.update(path)
        return pa

    def _walk_to(self, va: int, write: bool, path: list[int]) -> int:
        # pv and trap keep CR3 == root; bare lets the guest load CR3 itself
        table = self.root if self.tables else self.uc.reg_read(UC_X86_REG_CR3) & ADDR
        for level in (4, 3, 2, 1):
            path.append(table)
            index = (va >> (12 + 9 * (level - 1))) & 0x1FF
            entry = self.mem.read_u64(table + 8 * index)
            if not entry & P or (write and not entry & RW):
                why = "not mapped" if not entry & P else "mapped read-only"
                raise Refused(abi.EFAULT, f"guest address {va:#x} is {why}")
            if is_leaf(level, entry):
                size = PAGE_SIZE_AT[level]
                return (entry & ADDR & ~(size - 1)) | (va & (size - 1))
            table = entry & ADDR
        raise AssertionError("unreachable")

    # The usual guest access, within one page whose translation is cached, makes no call:
    # translate's first step and memory's permissions (GuestMemory.effective) inline.
    def read_virt(self, va: int, size: int) -> bytes:
        """Guest memory the guest itself may read, by virtual address."""
        offset = va & (PAGE - 1)
        if 0 < size <= PAGE - offset:                     # within one page: no list
            hit = self._tlb.get(va - offset)
            if hit is not None and hit < self._ram_end and self._perm[hit // PAGE] & R:
                return bytes(self._view[hit | offset:(hit | offset) + size])
            data = self.mem.read_if_guest_can(self.translate(va), size)
            if data is not None:
                return data
        return b"".join(self.mem.read(pa, n) for pa, n in self._pieces(va, size, write=False))

    def write_virt(self, va: int, data: bytes) -> None:
        """Store into guest memory the guest itself may write, by virtual address."""
        size, offset = len(data), va & (PAGE - 1)
        if 0 < size <= PAGE - offset:                    # within one page: no list
            hit = self._tlb.get(va - offset | True)
            if hit is not None and hit < self._ram_end and self._perm[hit // PAGE] & WX == W and \
                    hit not in self._pinned:
                self._view[hit | offset:(hit | offset) + size] = data
                return
            if self.mem.write_if_guest_can(self.translate(va, True), data):
                return
        off = 0
        for pa, n in self._pieces(va, size, write=True):    # all checked before anything is written
            self.mem.write(pa, data[off:off + n])
            off += n

    def _pieces(self, va: int, size: int, write: bool) -> list[tuple[int, int]]:
        out = []
        perm = W if write else R
        while size > 0:
            n = min(size, PAGE - (va & (PAGE - 1)))
            pa = self.translate(va, write)
            if not self.mem.guest_can(pa, n, perm):
                raise Refused(abi.EFAULT, f"guest address {va:#x} -> {self.mem.describe(pa)} is not "
                                          f"{'writable' if write else 'readable'} by the guest")
            out.append((pa, n))
            va, size = va + n, size - n
        return out

"""The emulation engine: Unicorn, pinned to one version and driven through its C API.

The runtime relies on Unicorn details no API promises, each found by
experiment and checked here when the first engine is made:

- the CPU context that `uc_context_save` copies is QEMU's `CPUX86State`
  after a 40-byte header, so the register file of an exit can be read and
  written in one copy each way (`RegisterFile`) instead of one C call per
  register (a `uc_reg_read` inside a hook costs more than a whole context
  save);
- the offsets of the fields used (general registers, RIP, RFLAGS, the
  TB flags, the control registers, EFER) are found by writing known values
  through the API and looking for them in a saved context (`_probe`);
- in 2.1.4 a context save or restore is a plain copy of that struct (no
  per-architecture hook on x86), so the register file can instead be a
  view of the live struct itself: no copy at all, which halves an exit's
  cost.  Where it lives is found once, safely, by reading the process's
  own memory through /proc/self/mem (`_probe_live`): the `cpu` pointer in
  Unicorn's engine struct, then the struct at a fixed distance from it.
  Each engine's view is checked against a context save before use; where
  /proc/self/mem cannot be read or the check fails, the register file
  copies instead (`RegisterFile.live` says which; `pvtool bench` shows it).

Hooks are registered through the C API too (`Engine.hook_*`), each behind
the exit gate (gate.py): the Python binding's wrapper costs twice a raw
callback.  Emulation runs holding the GIL (`Engine.emu_start`).  A
callback must never raise: the vCPU's guard catches everything (run.py).

If the installed Unicorn is not the pinned version, or a probe finds the
context laid out otherwise, `EngineError` stops the run before it starts,
with a message that says what to install.
"""
from __future__ import annotations

import ctypes
import struct
import weakref
from dataclasses import dataclass
from functools import partial
from typing import Callable

import unicorn
from unicorn import UC_ARCH_X86, UC_HOOK_INSN, UC_HOOK_INTR, UC_HOOK_MEM_INVALID, UC_MODE_64, Uc
from unicorn import x86_const as U
from unicorn.unicorn_py3 import unicorn as _binding

from .gate import Gate

PINNED_VERSION = "2.1.4"


class EngineError(Exception):
    """The installed Unicorn cannot run guests the way the runtime needs; str() is one line."""


# -- the C library, called directly -------------------------------------------------------

_lib = ctypes.CDLL(_binding.uclib._name)
_c_void_p, _c_int, _c_u64, _c_size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_size_t
for _name, _args in (("uc_context_save", [_c_void_p, _c_void_p]),
                     ("uc_context_restore", [_c_void_p, _c_void_p]),
                     ("uc_context_alloc", [_c_void_p, ctypes.POINTER(_c_void_p)]),
                     ("uc_context_free", [_c_void_p]),
                     ("uc_context_size", [_c_void_p]),
                     ("uc_reg_read", [_c_void_p, _c_int, _c_void_p]),
                     ("uc_reg_write", [_c_void_p, _c_int, _c_void_p]),
                     ("uc_emu_stop", [_c_void_p])):
    getattr(_lib, _name).argtypes = _args
    getattr(_lib, _name).restype = _c_size if _name == "uc_context_size" else _c_int
_context_save, _context_restore = _lib.uc_context_save, _lib.uc_context_restore


# emu_start through a PyDLL holds the GIL while the guest runs, so a hook's ctypes callback finds it
# already held: no hand-over between threads at every exit (about 400 host instructions, measured).
# Nothing else in the process needs it meanwhile: the watchdog is native code (watchdog.py).
_emu_start = ctypes.PyDLL(_binding.uclib._name).uc_emu_start
_emu_start.argtypes = [_c_void_p, _c_u64, _c_u64, _c_u64, _c_size]
_emu_start.restype = _c_int
EMU_STOP = ctypes.cast(_lib.uc_emu_stop, _c_void_p).value     # for native code (watchdog.py)

# QEMU's own one-page TLB flush, what the guest's `invlpg` runs: the API offers only a global flush,
# which clears (and then refills) every translation at each guest `invlpg` the hypervisor performs.
# It takes the CPU object, which only a live register file locates (Engine.flush_page).
_tlb_flush_page = getattr(_lib, "tlb_flush_page_x86_64", None)
if _tlb_flush_page is not None:
    _tlb_flush_page.argtypes = [_c_void_p, _c_u64]
    _tlb_flush_page.restype = None


class _Msr(ctypes.Structure):
    """unicorn.h's uc_x86_msr: what uc_reg_read of UC_X86_REG_MSR fills in."""
    _fields_ = [("rid", ctypes.c_uint32), ("value", ctypes.c_uint64)]


# Each hook's own arguments (unicorn.h): what the exit gate passes a Python hook of that type.
# Unicorn passes its handle before them and the user data after (gate.py).
SYSCALL_CB = ctypes.CFUNCTYPE(None)
IN_CB = ctypes.CFUNCTYPE(ctypes.c_uint32, ctypes.c_uint32, _c_int)                   # port, size
OUT_CB = ctypes.CFUNCTYPE(None, ctypes.c_uint32, _c_int, ctypes.c_uint32)            # port, size, value
CPUID_CB = ctypes.CFUNCTYPE(_c_int)
INTR_CB = ctypes.CFUNCTYPE(None, ctypes.c_uint32)                                    # vector
MEM_INVALID_CB = ctypes.CFUNCTYPE(ctypes.c_bool, _c_int, _c_u64, _c_int, ctypes.c_int64)   # access, address, size, value


def check_version() -> None:
    """Refuse to run on a Unicorn other than the pinned one (binding and library)."""
    found = getattr(unicorn, "__version__", "unknown")
    major, minor, patch = (int(x) for x in PINNED_VERSION.split("."))
    library = _lib.uc_version(None, None)
    want_library = major << 24 | minor << 16 | patch << 8
    if found != PINNED_VERSION or library & 0xFFFFFF00 != want_library:
        raise EngineError(f"the runtime needs unicorn {PINNED_VERSION} (found {found}); "
                          f"install it with: python3 -m pip install unicorn=={PINNED_VERSION}")


# -- where the registers are in a saved context ------------------------------------------------

HEADER = 40              # uc_context's own fields before the copied CPUX86State
GPR_ORDER = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")      # QEMU's regs[] order


@dataclass(frozen=True)
class Layout:
    """Byte offsets into a saved context (header included)."""
    gpr: dict[str, int]
    rip: int
    eflags: int           # IF, IOPL, TF ... (the arithmetic flags live elsewhere while running)
    hflags: int           # QEMU's TB flags: CPL in bits 0-1, the sti shadow in bit 3
    cr: dict[int, int]
    efer: int
    size: int
    msrs: dict[int, int]  # STAR, LSTAR, SFMASK: read at every system call
    tables: dict[int, int]  # GDTR, IDTR, TR (Unicorn's register ids): the base; the u32 limit follows it
    privilege: "Privilege | None" = None
    live: "tuple[int, int] | None" = None   # (offset of `cpu` in uc_struct, of the CPU state from *cpu)


@dataclass(frozen=True)
class Privilege:
    """Where the CPU keeps its privilege level, and what it looks like in kernel and in user mode.

    Unicorn runs `iretq`/`sysretq` to ring 3 itself, but never enters ring 0
    from ring 3 (it has no exception delivery, and its `syscall` is a hook).
    The runtime does that by writing, into the saved context, the code and
    stack segment caches and TB flags a real entry would leave: `kernel`
    and `user` are those bytes as Unicorn itself loaded them, by running
    `iretq` to the ABI's flat kernel (0x08/0x10) and user (0x23/0x1b)
    selectors in a probe.  Also here: the error code of the exception
    being delivered, and QEMU's 'exception in flight' record, which must be
    cleared after each delivery or the next page fault becomes a #DF."""
    hflags: int
    cs: int               # the CS segment cache: selector u32, base u64, limit u32, flags u32
    ss: int
    error_code: int       # i32
    old_exception: int    # i32: -1 when no exception is in flight
    kernel: bytes         # hflags (4 bytes), CS cache, SS cache in kernel mode
    user: bytes           # the same in user mode


SEGMENT_CACHE = 24


HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3   # the one-instruction interrupt shadow after sti / mov ss


def _context_buffer(uc: Uc):
    """A uc_context for `uc` (its header filled by Unicorn), as a ctypes byte array over its memory.

    Freed when the array is collected (a finalizer on it)."""
    ptr = _c_void_p()
    if _lib.uc_context_alloc(uc._uch, ctypes.byref(ptr)):
        raise EngineError("unicorn cannot allocate a CPU context")
    size = _lib.uc_context_size(uc._uch)
    buf = (ctypes.c_char * size).from_address(ptr.value)
    weakref.finalize(buf, _lib.uc_context_free, ptr.value)
    return buf


def _probe() -> Layout:
    """Find the fields in a saved context by writing known values through the API."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    size = _lib.uc_context_size(uc._uch)
    buf = _context_buffer(uc)
    gpr_ids = [getattr(U, f"UC_X86_REG_{name.upper()}") for name in GPR_ORDER]
    for k, reg in enumerate(gpr_ids):
        uc.reg_write(reg, 0x5A5A_0000_0000_0000 | k << 8 | k)
    uc.reg_write(U.UC_X86_REG_RIP, 0x5A5A_1234_5678_9ABC)
    snap = _save(uc, buf)
    base = snap.find(struct.pack("<Q", 0x5A5A_0000_0000_0000))
    if base != HEADER:
        raise EngineError(f"unicorn's saved context is not laid out as expected (registers at {base}); "
                          f"the runtime is pinned to unicorn {PINNED_VERSION}")
    gpr = {name: base + 8 * k for k, name in enumerate(GPR_ORDER)}
    rip, eflags, hflags = base + 128, base + 136, base + 176
    cr = {}
    for n in (0, 2, 3, 4):
        before = _save(uc, buf)
        value = uc.reg_read(getattr(U, f"UC_X86_REG_CR{n}"))
        probe = {0: value ^ (1 << 18), 2: 0x7ABC_DEF0_1234, 3: 0x7_F000, 4: value ^ (1 << 9)}[n]    # AM, a page, OSFXSR
        uc.reg_write(getattr(U, f"UC_X86_REG_CR{n}"), probe)
        cr[n] = _changed_u64(before, _save(uc, buf), probe)
        uc.reg_write(getattr(U, f"UC_X86_REG_CR{n}"), value)
    before = _save(uc, buf)
    uc.msr_write(0xC0000080, 1 << 11)                    # EFER.NXE (Unicorn keeps LMA as it was)
    efer = _changed_u64(before, _save(uc, buf), uc.msr_read(0xC0000080))
    msrs = {}
    for n, probe in SYSCALL_MSRS.items():
        before = _save(uc, buf)
        uc.msr_write(n, probe)
        msrs[n] = _changed_u64(before, _save(uc, buf), probe)
        uc.msr_write(n, 0)
    tables = {reg: _probe_table(uc, buf, reg, k) for k, reg in enumerate(TABLE_REGS)}
    layout = Layout(gpr, rip, eflags, hflags, cr, efer, size, msrs, tables)
    _verify(uc, buf, layout, gpr_ids)
    return Layout(gpr, rip, eflags, hflags, cr, efer, size, msrs, tables, _probe_privilege(hflags),
                  _probe_live(uc, _save(uc, buf)))


TABLE_REGS = (U.UC_X86_REG_GDTR, U.UC_X86_REG_IDTR, U.UC_X86_REG_TR)


def _probe_table(uc: Uc, buf, reg: int, k: int) -> int:
    """Where a descriptor-table or task register's base sits (QEMU's SegmentCache: the limit follows)."""
    base, limit = 0x5A5A_0000_0001_2000 + k * 0x1000, 0x0FF7 - k
    before = _save(uc, buf)
    uc.reg_write(reg, (0, base, limit, 0))
    after = _save(uc, buf)
    at = _changed_u64(before, after, base)
    if struct.unpack_from("<I", after, at + 8)[0] != limit:
        raise EngineError(f"unicorn's descriptor-table registers are not laid out as expected; "
                          f"the runtime is pinned to unicorn {PINNED_VERSION}")
    uc.reg_write(reg, (0, 0, 0, 0))
    return at


# STAR, LSTAR, SFMASK, each with a value to look for (the selectors, a canonical address, a mask)
SYSCALL_MSRS = {0xC0000081: 0x0023_0008 << 32, 0xC0000082: 0x7F5A_1234_5000, 0xC0000084: 0x4_7700}


ENGINE_SCAN = 0x1000           # bytes of uc_struct searched for its `cpu` pointer
CPU_SCAN = 0x40000             # bytes after *cpu searched for the CPU state (X86CPU embeds it)


def _probe_live(uc: Uc, snap: bytes) -> tuple[int, int] | None:
    """Where the live CPU state is, as (offset of the `cpu` pointer in the engine struct, offset
    of the state from what it points to); None if this process cannot read its own memory.

    A candidate must follow a register written through the API, so a stale
    copy of the registers elsewhere in memory is not mistaken for the state;
    and it must hold in fresh engines too: a pointer that merely lands below
    the state in the heap (so the state is found at some distance after it
    once) gives another distance in the next engine, while the `cpu` field
    always gives the same."""
    regs = snap[HEADER:HEADER + 8 * len(GPR_ORDER)]      # the distinct values _probe left
    engine = _read_own(uc._uch.value, ENGINE_SCAN)
    size = _lib.uc_context_size(uc._uch)
    for at in range(0, len(engine) - 7, 8):
        cpu = struct.unpack_from("<Q", engine, at)[0]
        if cpu % 8 or cpu < 0x10000 or cpu >= 1 << 47:
            continue
        found = _read_own(cpu, CPU_SCAN).find(regs)
        if found >= 0 and _follows_api(uc, cpu + found) and \
                all(_state_address(Uc(UC_ARCH_X86, UC_MODE_64), (at, found), size) for _ in range(2)):
            return at, found
    return None


def _state_address(uc: Uc, where: tuple[int, int], size: int) -> int | None:
    """The address of `uc`'s live CPU state if `where` finds it (it equals a context save), else None."""
    cpu_field, state = where
    check = _context_buffer(uc)
    _context_save(uc._uch, check)          # also makes Unicorn create its CPU (it does so lazily)
    cpu = struct.unpack("<Q", _read_own(uc._uch.value + cpu_field, 8).ljust(8, b"\0"))[0]
    if cpu == 0 or _read_own(cpu + state, size - HEADER) != bytes(check)[HEADER:]:
        return None
    return cpu + state


def _follows_api(uc: Uc, state: int) -> bool:
    old = uc.reg_read(U.UC_X86_REG_RAX)
    uc.reg_write(U.UC_X86_REG_RAX, 0x3C3C_5A5A_0F0F_A5A5)
    ok = _read_own(state, 8) == struct.pack("<Q", 0x3C3C_5A5A_0F0F_A5A5)
    uc.reg_write(U.UC_X86_REG_RAX, old)
    return ok


def _read_own(address: int, size: int) -> bytes:
    """`size` bytes of this process's memory at `address`, fewer where it is not mapped:
    through /proc/self/mem, where a bad address is an error, not a crash."""
    try:
        with open("/proc/self/mem", "rb", buffering=0) as mem:
            mem.seek(address)
            return mem.read(size) or b""
    except (OSError, OverflowError, ValueError):
        return b""


def _live_view(uc: Uc, size: int):
    """A byte view of `uc`'s live CPU state laid out like a saved context (header included),
    or None where the probe could not find it (the register file then copies: slower, as correct)."""
    where = layout().live
    address = None if where is None else _state_address(uc, where, size)
    return None if address is None else (ctypes.c_char * size).from_address(address - HEADER)


# The probe machine: the ABI's GDT, one 2 MiB user page, code that goes to ring 3 and faults there.
_PROBE_GDT = (0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF, 0x00CFF3000000FFFF, 0x00AFFB000000FFFF)


def _probe_privilege(hflags: int) -> Privilege:
    runs = [_ring_trip(sel) for sel in (0x1238, 0x2468)]      # two faults with different error codes
    (kernel, user, fault1), (_, _, fault2) = runs
    cs = _field(kernel, user, 0x08, 0x23)
    ss = _field(kernel, user, 0x10, 0x1B)
    error = _field(fault1, fault2, 0x1238, 0x2468)
    old = _field(kernel, fault1, 0xFFFFFFFF, 13)
    if user[hflags] & HF_CPL_MASK != 3 or kernel[hflags] & HF_CPL_MASK != 0:
        raise EngineError(f"unicorn's privilege level is not where expected; the runtime is pinned to "
                          f"unicorn {PINNED_VERSION}")
    take = lambda snap: snap[hflags:hflags + 4] + snap[cs:cs + SEGMENT_CACHE] + snap[ss:ss + SEGMENT_CACHE]
    return Privilege(hflags, cs, ss, error, old, take(kernel), take(user))


def _ring_trip(selector: int) -> tuple[bytes, bytes, bytes]:
    """Context snapshots: after an iretq to kernel selectors, after one to user selectors,
    and inside the #GP(selector) that the user code raises by loading a bad selector."""
    uc = Uc(UC_ARCH_X86, UC_MODE_64)
    buf = _context_buffer(uc)
    uc.mem_map(0, 4 << 20)
    pml4, pdpt, pd, gdt, stack = 0x10000, 0x11000, 0x12000, 0x13000, 0x8000
    uc.mem_write(pml4, struct.pack("<Q", pdpt | 7))
    uc.mem_write(pdpt, struct.pack("<Q", pd | 7))
    uc.mem_write(pd, struct.pack("<2Q", 0x87, 0x200000 | 0x87))
    uc.mem_write(gdt, struct.pack(f"<{len(_PROBE_GDT)}Q", *_PROBE_GDT))
    uc.reg_write(U.UC_X86_REG_CR3, pml4)
    uc.reg_write(U.UC_X86_REG_CR4, uc.reg_read(U.UC_X86_REG_CR4) | 0x20)
    uc.msr_write(0xC0000080, 0xD01)
    uc.reg_write(U.UC_X86_REG_CR0, 0x80010033)
    uc.reg_write(U.UC_X86_REG_GDTR, (0, gdt, 8 * len(_PROBE_GDT) - 1, 0))
    frames = struct.pack("<10Q", 0x1002, 0x08, 0x2, stack - 40, 0x10,     # iretq to the kernel ...
                         0x2000, 0x23, 0x202, 0x9000, 0x1B)                # ... then to user mode
    uc.mem_write(stack - 80, frames)
    uc.mem_write(0x1000, bytes.fromhex("48cf 48cf"))                      # iretq; iretq
    uc.mem_write(0x2000, b"\x66\xb8" + struct.pack("<H", selector) + b"\x8e\xd8")   # mov ax, sel; mov ds, ax
    uc.reg_write(U.UC_X86_REG_RSP, stack - 80)
    seen: list[bytes] = []

    def on_fault(uc, intno, data):
        seen.append(_save(uc, buf) if intno == 13 else b"")
        uc.emu_stop()
    uc.hook_add(UC_HOOK_INTR, on_fault)
    snaps = []
    for begin in (0x1000, 0x1002):
        uc.emu_start(begin, 0x1004, count=1)
        snaps.append(_save(uc, buf))
    uc.emu_start(0x2000, 0x2006, count=4)
    if len(seen) != 1 or not seen[0]:
        raise EngineError(f"unicorn did not raise #GP in ring 3 as expected; the runtime is pinned to "
                          f"unicorn {PINNED_VERSION}")
    return snaps[0], snaps[1], seen[0]


def _field(a: bytes, b: bytes, value_a: int, value_b: int) -> int:
    """The offset of the one u32 field past the registers that holds value_a in snapshot a and value_b in b."""
    hits = [k for k in range(HEADER + 8 * (len(GPR_ORDER) + 2), min(len(a), len(b)) - 3, 4)
            if struct.unpack_from("<I", a, k)[0] == value_a and struct.unpack_from("<I", b, k)[0] == value_b]
    if len(hits) != 1:
        raise EngineError(f"cannot locate a CPU field in unicorn's saved context ({len(hits)} candidates); "
                          f"the runtime is pinned to unicorn {PINNED_VERSION}")
    return hits[0]


def _save(uc: Uc, buf) -> bytes:
    _context_save(uc._uch, buf)
    return bytes(buf)


def _changed_u64(before: bytes, after: bytes, value: int) -> int:
    want = struct.pack("<Q", value)
    hits = [k for k in range(HEADER, len(after) - 7, 8) if after[k:k + 8] == want and before[k:k + 8] != want]
    if len(hits) != 1:
        raise EngineError(f"cannot locate a control register in unicorn's saved context ({len(hits)} candidates); "
                          f"the runtime is pinned to unicorn {PINNED_VERSION}")
    return hits[0]


def _verify(uc: Uc, buf, layout: Layout, gpr_ids: list[int]) -> None:
    """A round trip: values written into the buffer and restored must read back through the API."""
    _context_save(uc._uch, buf)
    for k, name in enumerate(GPR_ORDER):
        struct.pack_into("<Q", buf, layout.gpr[name], 0x6B6B_0000_0000_0000 | k)
    struct.pack_into("<Q", buf, layout.rip, 0x401000)
    _context_restore(uc._uch, buf)
    ok = all(uc.reg_read(reg) == 0x6B6B_0000_0000_0000 | k for k, reg in enumerate(gpr_ids))
    if not ok or uc.reg_read(U.UC_X86_REG_RIP) != 0x401000 or \
            struct.unpack_from("<Q", buf, layout.eflags)[0] & 2 != 2:
        raise EngineError(f"unicorn's context round trip failed; the runtime is pinned to unicorn {PINNED_VERSION}")


_LAYOUT: Layout | None = None


def layout() -> Layout:
    global _LAYOUT
    if _LAYOUT is None:
        check_version()
        _LAYOUT = _probe()
    return _LAYOUT


# -- the register file of one exit ----------------------------------------------------------------

_U64 = struct.Struct("<Q")
_U32 = struct.Struct("<I")
_TABLE = struct.Struct("<QI")


GPR_INDEX = {name: k for k, name in enumerate(GPR_ORDER)}
RIP_INDEX = len(GPR_ORDER)


def _segment_writes(priv: Privilege, template: bytes) -> tuple[int, int, bytes]:
    """(start, end, bytes): a ring's CS and SS caches, neighbours in the state (QEMU's segs[] has SS after CS)."""
    if priv.ss != priv.cs + SEGMENT_CACHE:
        raise EngineError(f"unicorn's segment caches are not laid out as expected; "
                          f"the runtime is pinned to unicorn {PINNED_VERSION}")
    return priv.cs, priv.ss + SEGMENT_CACHE, template[4:4 + 2 * SEGMENT_CACHE]


class EntryFields:
    """Raw fields (RegisterFile) of what every exception's entry reads, in the state itself (each
    table register as Unicorn keeps it: the u64 base, then the u32 limit)."""
    __slots__ = ("error_code", "in_flight", "cr2", "idt_base", "idt_limit", "tr_base", "tr_limit", "cs", "ss")

    def __init__(self, base: int, lay: Layout):
        priv, idtr, tr = lay.privilege, lay.tables[U.UC_X86_REG_IDTR], lay.tables[U.UC_X86_REG_TR]
        self.error_code = ctypes.c_uint32.from_address(base + priv.error_code)   # of the exception reported
        self.in_flight = ctypes.c_int32.from_address(base + priv.old_exception)  # -1: none (clear_exception)
        self.cr2 = _c_u64.from_address(base + lay.cr[2])
        self.idt_base = _c_u64.from_address(base + idtr)
        self.idt_limit = ctypes.c_uint32.from_address(base + idtr + 8)
        self.tr_base = _c_u64.from_address(base + tr)                           # the TSS: rsp0, from user mode
        self.tr_limit = ctypes.c_uint32.from_address(base + tr + 8)
        self.cs = ctypes.c_uint32.from_address(base + priv.cs)                  # the selectors, from their caches
        self.ss = ctypes.c_uint32.from_address(base + priv.ss)


class RegisterFile:
    """The vCPU's registers: Unicorn's CPU state itself where it can be found (`live`), else a copy.

    A live file reads and writes the running CPU's struct in place: no copy
    in either direction.  A copied one is loaded with one context save and
    written back with one restore.  Inside an exit (`begin_exit` .. `finish`)
    a copy is always current and always written back, so the hot paths can
    use the raw fields (`gprs`, `hflags_word`, `eflags_word`, `raw_control`,
    and `entry`, what an exception's entry reads: ctypes and struct views of
    the buffer, one C call per access, no Python frame) in either kind of
    file.  Anything that changes the CPU through
    Unicorn's API instead (a CR0 write) must `store` first and `invalidate`
    after, so neither copy overwrites the other."""

    __slots__ = ("uc", "handle", "buf", "view", "live", "loaded", "dirty", "in_exit",
                 "gprs", "hflags_word", "eflags_word", "raw_control", "control_addresses", "entry",
                 "_gpr", "_rip", "_cr", "_efer",
                 "_priv", "_msrs", "_rings", "_scratch", "_scratch_ref", "_msr", "_msr_ref", "_tables")

    def __init__(self, uc: Uc):
        lay = layout()
        self.uc = uc                  # holds the engine open as long as its raw handle is used
        self.handle = uc._uch
        self.buf = _live_view(uc, lay.size)
        self.live = self.buf is not None
        if not self.live:
            self.buf = _context_buffer(uc)
        self.view = memoryview(self.buf).cast("B")
        self.loaded = self.dirty = self.live     # a live view is always loaded; nothing to write back
        self.in_exit = False
        self._gpr, self._rip = lay.gpr, lay.rip
        self._cr, self._efer = lay.cr, lay.efer
        base = ctypes.addressof(self.buf)
        self.gprs = (_c_u64 * (RIP_INDEX + 1)).from_address(base + lay.gpr["rax"])   # GPR_ORDER, then RIP
        self.hflags_word = ctypes.c_uint32.from_address(base + lay.hflags)
        self.eflags_word = _c_u64.from_address(base + lay.eflags)
        # CR0, CR3, CR4 and EFER in one unpack: the fields sit in that order after CR0
        at = sorted((lay.cr[0], lay.cr[3], lay.cr[4], lay.efer))
        if at != [lay.cr[0], lay.cr[3], lay.cr[4], lay.efer]:
            raise EngineError(f"unicorn's control registers are not laid out as expected; "
                              f"the runtime is pinned to unicorn {PINNED_VERSION}")
        fmt = "<Q" + "".join(f"{b - a - 8}xQ" if b - a > 8 else "Q" for a, b in zip(at, at[1:]))
        self.raw_control = partial(struct.Struct(fmt).unpack_from, self.view, at[0])
        # where the gate reads them at every exit: only a live view holds the CPU's current values
        self.control_addresses = tuple(base + a for a in at) if self.live else None
        self._priv, self._msrs = lay.privilege, lay.msrs
        self._rings = {0: _segment_writes(lay.privilege, lay.privilege.kernel),
                       3: _segment_writes(lay.privilege, lay.privilege.user)}
        # one C call through ctypes for what the context does not hold ready (RFLAGS's arithmetic
        # flags, MSRs): the binding's reg_read costs several times more
        self._scratch = _c_u64()
        self._scratch_ref = ctypes.byref(self._scratch)
        self._msr = _Msr()
        self._msr_ref = ctypes.byref(self._msr)
        self._tables = lay.tables
        self.entry = EntryFields(base, lay)

    def begin_exit(self) -> None:
        """An exit starts: a copied file is loaded now and written back at `finish`, whatever changes."""
        if not self.live:
            self.load()
            self.dirty = self.in_exit = True

    def load(self) -> None:
        if not self.loaded:
            _context_save(self.handle, self.buf)
            self.loaded = True

    def store(self) -> None:
        if self.dirty and not self.live:
            _context_restore(self.handle, self.buf)
            self.dirty = self.in_exit        # inside an exit the raw fields may still be written

    def invalidate(self) -> None:
        if self.live:
            return
        if self.in_exit:                     # keep the copy current for the raw fields
            _context_save(self.handle, self.buf)
        else:
            self.loaded = self.dirty = False

    def finish(self) -> None:
        """End of an exit: write back what changed, and read afresh next time."""
        if not self.live:
            if self.dirty:
                _context_restore(self.handle, self.buf)
            self.loaded = self.dirty = self.in_exit = False

    def __getitem__(self, name: str) -> int:
        if not self.loaded:
            self.load()
        return _U64.unpack_from(self.view, self._gpr[name])[0]

    def __setitem__(self, name: str, value: int) -> None:
        if not self.loaded:
            self.load()
        _U64.pack_into(self.view, self._gpr[name], value & 0xFFFF_FFFF_FFFF_FFFF)
        self.dirty = True

    def read(self, *names: str) -> tuple[int, ...]:
        if not self.loaded:
            self.load()
        view, gpr = self.view, self._gpr
        return tuple(_U64.unpack_from(view, gpr[n])[0] for n in names)

    def control(self) -> tuple[int, int, int, int]:
        """(CR0, CR3, CR4, EFER), in one read."""
        if not self.loaded:
            self.load()
        return self.raw_control()

    @property
    def rip(self) -> int:
        if not self.loaded:
            self.load()
        return _U64.unpack_from(self.view, self._rip)[0]

    @rip.setter
    def rip(self, value: int) -> None:
        # Through the context, not uc_reg_write: writing RIP through the API leaves
        # Unicorn 2.1.4 skipping its PC sync for the rest of the emu_start, and every
        # later memory hook then sees the start of the block as RIP.
        if not self.loaded:
            self.load()
        _U64.pack_into(self.view, self._rip, value & 0xFFFF_FFFF_FFFF_FFFF)
        self.dirty = True

    @property
    def eflags(self) -> int:
        """RFLAGS as stored while running: IF, TF, IOPL, ... but not the arithmetic flags."""
        if not self.loaded:
            self.load()
        return self.eflags_word.value

    @property
    def hflags(self) -> int:
        if not self.loaded:
            self.load()
        return self.hflags_word.value

    def cr(self, n: int) -> int:
        """CR0, CR2, CR3 or CR4."""
        if not self.loaded:
            self.load()
        return _U64.unpack_from(self.view, self._cr[n])[0]

    def table(self, reg: int) -> tuple[int, int]:
        """(limit, base) of GDTR, IDTR or TR (TABLE_REGS), from the state: what every exception reads."""
        if not self.loaded:
            self.load()
        base, limit = _TABLE.unpack_from(self.view, self._tables[reg])
        return limit, base

    @property
    def efer(self) -> int:
        if not self.loaded:
            self.load()
        return _U64.unpack_from(self.view, self._efer)[0]

    # -- through the C API -------------------------------------------------------------------
    def api_read(self, reg: int) -> int:
        """A scalar register (RFLAGS, a segment selector, ...) as Unicorn's API computes it."""
        if not self.live:                    # (store's own test first: every exception comes here)
            self.store()
        self._scratch.value = 0
        if _lib.uc_reg_read(self.handle, reg, self._scratch_ref):
            raise RuntimeError(f"internal error: unicorn refused to read register {reg}")
        return self._scratch.value

    def api_write(self, reg: int, value: int) -> None:
        self.store()
        self._scratch.value = value
        if _lib.uc_reg_write(self.handle, reg, self._scratch_ref):
            raise RuntimeError(f"internal error: unicorn refused to write register {reg}")
        self.invalidate()

    def msr(self, n: int) -> int:
        """An MSR Unicorn keeps (the system-call ones straight from the state)."""
        at = self._msrs.get(n)
        if at is not None:
            if not self.loaded:
                self.load()
            return _U64.unpack_from(self.view, at)[0]
        self.store()
        self._msr.rid, self._msr.value = n, 0
        if _lib.uc_reg_read(self.handle, U.UC_X86_REG_MSR, self._msr_ref):
            raise RuntimeError(f"internal error: unicorn refused to read MSR {n:#x}")
        return self._msr.value

    def set_msr(self, n: int, value: int) -> None:
        """Through the API: an MSR write can have effects beyond its field (EFER)."""
        self.store()
        self._msr.rid, self._msr.value = n, value
        if _lib.uc_reg_write(self.handle, U.UC_X86_REG_MSR, self._msr_ref):
            raise RuntimeError(f"internal error: unicorn refused to write MSR {n:#x}")
        self.invalidate()

    def selector(self, ring_segment: str) -> int:
        """The CS or SS selector."""
        return self.selectors()[ring_segment == "ss"]

    def selectors(self) -> tuple[int, int]:
        """(CS, SS), from their segment caches in the state: what every interrupt entry and return reads."""
        if not self.loaded:
            self.load()
        view, priv = self.view, self._priv
        return _U32.unpack_from(view, priv.cs)[0], _U32.unpack_from(view, priv.ss)[0]

    # -- privilege --------------------------------------------------------------------------
    def enter_ring(self, ring: int) -> None:
        """Switch the CPU to ring 0 or 3 with the ABI's flat code and stack segments (engine.Privilege)."""
        if not self.loaded:
            self.load()
        at, end, caches = self._rings[ring]
        self.view[at:end] = caches
        word = self.hflags_word
        word.value = word.value & ~HF_CPL_MASK | ring
        self.dirty = True

    def clear_exception(self) -> None:
        """Forget the exception in flight: else QEMU turns the next page fault into a #DF."""
        if not self.loaded:
            self.load()
        _U32.pack_into(self.view, self._priv.old_exception, 0xFFFFFFFF)
        self.dirty = True

    def clear_rflags(self, mask: int) -> None:
        """Clear bits of RFLAGS that are stored as such (TF, IF, NT, RF), never an arithmetic flag:
        what every interrupt entry does.  A live file clears them in place.  A copied one goes
        through the API: written back only at the end of the exit, the same change leaves a
        copied-file run of kernels/unix.pvk in bare mode hanging inside Unicorn
        (tests/test_runtime_engine.py runs it), which a mid-exit write-back avoids."""
        if self.live:
            word = self.eflags_word
            word.value &= ~mask
        else:
            self.api_write(U.UC_X86_REG_RFLAGS, self.api_read(U.UC_X86_REG_RFLAGS) & ~mask)

    def set_eflags_bit(self, mask: int, on: bool) -> None:
        """Set or clear a bit of RFLAGS that is stored as such (IF, TF): not an arithmetic flag."""
        if not self.loaded:
            self.load()
        word = self.eflags_word
        word.value = word.value | mask if on else word.value & ~mask
        self.dirty = True


# -- hooks through the C API ------------------------------------------------------------------------

class Engine:
    """A Unicorn x86-64 CPU with raw hooks, each behind the exit gate (gate.py); keeps the callbacks
    alive as long as itself."""

    def __init__(self) -> None:
        layout()                              # checks the version and the context layout once
        self.uc = Uc(UC_ARCH_X86, UC_MODE_64)
        self.regs = RegisterFile(self.uc)
        try:
            self.gate = Gate()
        except OSError as e:
            raise EngineError(e.strerror) from None
        self.flush_page: Callable[[int], None] | None = None
        """Flush one page's translations from Unicorn's TLB; None where the CPU object is unknown."""
        live = layout().live
        if self.regs.live and live is not None and _tlb_flush_page is not None:
            cpu = ctypes.addressof(self.regs.buf) + HEADER - live[1]     # the state sits live[1] into it
            self.flush_page = partial(_tlb_flush_page, cpu)

    def emu_start(self, begin: int, until: int, count: int = 0) -> None:
        """Run the guest from `begin` (at most `count` instructions if not 0), holding the GIL."""
        status = _emu_start(self.uc._uch, begin, until, 0, count)
        if status:
            raise unicorn.UcError(status)

    def _add(self, kind: int, callback_type: type, fn: Callable, changed: Callable,
             begin: int = 1, end: int = 0, *extra: int) -> int:
        code, data = self.gate.front(callback_type, fn, changed)
        handle = ctypes.c_size_t()
        status = _binding.uclib.uc_hook_add(self.uc._uch, ctypes.byref(handle), kind, _c_void_p(code),
                                            _c_void_p(data), ctypes.c_uint64(begin), ctypes.c_uint64(end),
                                            *(ctypes.c_int(x) for x in extra))
        if status:
            raise EngineError(f"unicorn refused a hook: {unicorn.UcError(status)}")
        return handle.value

    # Each hook gets the hook's own arguments (port, size, vector, ...), no adapter in between: a
    # Python frame per exit is a sizeable share of an exit's cost.  `changed` runs instead of the
    # hook when the gate finds the control state changed (gate.py).
    def hook_syscall(self, fn: Callable, changed: Callable) -> None:
        self._add(UC_HOOK_INSN, SYSCALL_CB, fn, changed, 1, 0, U.UC_X86_INS_SYSCALL)

    def hook_in(self, fn: Callable, changed: Callable) -> None:
        self._add(UC_HOOK_INSN, IN_CB, fn, changed, 1, 0, U.UC_X86_INS_IN)

    def hook_out(self, fn: Callable, changed: Callable) -> None:
        self._add(UC_HOOK_INSN, OUT_CB, fn, changed, 1, 0, U.UC_X86_INS_OUT)

    def hook_cpuid(self, fn: Callable, changed: Callable) -> None:
        self._add(UC_HOOK_INSN, CPUID_CB, fn, changed, 1, 0, U.UC_X86_INS_CPUID)

    def hook_interrupt(self, fn: Callable, changed: Callable) -> None:
        self._add(UC_HOOK_INTR, INTR_CB, fn, changed)

    def hook_invalid_memory(self, fn: Callable, changed: Callable) -> None:
        self._add(UC_HOOK_MEM_INVALID, MEM_INVALID_CB, fn, changed)

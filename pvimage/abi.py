"""The PV ABI: the one definition of the contract between a guest and the runtime.

Both the compiler (paravirt pass, linker) and the hypervisor (`runtime/`)
import these numbers; `docs/abi.md` explains them for people writing guests
by hand.  Modelled on Xen's x86-64 PV interface: a hypercall page filled by
the hypervisor, a shared page holding the virtual interrupt mask and the
virtual control registers, multicalls, validated page-table updates.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass

ABI_VERSION = 2             # 2: NaCl-style code rules (docs/abi.md section 8), stubs return by masked jump

# -- guest-physical memory the hypervisor keeps for itself ---------------------
# Everything below 1 MiB belongs to the hypervisor; images load at or above
# LOAD_BASE, and 16-64 MiB is always free for the kernel.
LOAD_BASE = 0x100000
RESERVED_END = 0x100000
START_INFO = 0x1000          # read-only to the guest
SHARED_PAGE = 0x2000         # read-write, the guest's view of its virtual CPU
BOOT_PML4 = 0x3000           # initial page tables: identity map of the first GiB,
BOOT_PDPT = 0x4000           # 2 MiB pages; live, so write-protected
BOOT_PD = 0x5000
BOOT_GDT = 0x6000            # null, 64-bit code (0x08), data (0x10)
# The descriptors, with accessed bits preset so the CPU never writes to a
# read-only table when it loads a selector.
BOOT_GDT_ENTRIES = struct.pack("<3Q", 0, 0x00AF9B000000FFFF, 0x00CF93000000FFFF)
BOOT_GDT_LIMIT = len(BOOT_GDT_ENTRIES) - 1
BOOT_STACK_TOP = 0x80000     # 64 KiB below it
BOOT_STACK_SIZE = 0x10000
KERNEL_CS = 0x08
KERNEL_DS = 0x10
# User mode (docs/abi.md, "User mode"): the GDT layout sysretq expects with STAR[63:48] = 0x10 and
# STAR[47:32] = KERNEL_CS.  A native kernel builds this GDT itself; the runtime's CPU loads these
# selectors as flat 64-bit segments.
USER_DS = 0x1B               # index 3, RPL 3
USER_CS = 0x23               # index 4, RPL 3
TSS_SELECTOR = 0x28          # a 16-byte 64-bit TSS descriptor, indices 5-6
FREE_RAM_START = 16 << 20    # kernels may use 16-64 MiB freely
FREE_RAM_END = 64 << 20
DEFAULT_RAM = 64 << 20
PAGE_SIZE = 4096

# -- ELF notes ------------------------------------------------------------------
NOTE_OWNER = "PVTool"
NOTE_ABI_VERSION = 1       # desc: u32 ABI_VERSION
NOTE_MODE = 2              # desc: u32 MODE_NATIVE or MODE_PV
NOTE_FEATURES = 3          # desc: u32 bit set of FEATURE_*
NOTE_HYPERCALL_PAGE = 4    # desc: u64 guest address of a page-aligned, 4 KiB page in text
NOTE_GUEST_NAME = 5        # desc: NUL-terminated UTF-8 name
MODE_NATIVE = 0
MODE_PV = 1
FEATURE_MULTICALL = 1 << 0  # the guest queues batched operations in the shared page
FEATURE_EVENTS = 1 << 1     # the guest takes interrupts as upcalls (registers a trap table)

XEN_NOTE_OWNER = "Xen"
XEN_ELFNOTE_PHYS32_ENTRY = 18   # desc: u32 32-bit physical entry (PVH boot, QEMU)

# -- boot contract ----------------------------------------------------------------
# A PV image is entered at e_entry in 64-bit mode, CPL 0, paging on (CR3 =
# BOOT_PML4, the first GiB identity-mapped), virtual interrupts masked,
# rsp = BOOT_STACK_TOP, rsi = START_INFO.  Native images in `bare`/`trap`
# mode are entered the same way.

# start-info page (read-only), all fields u64 little-endian
START_INFO_MAGIC = int.from_bytes(b"PVSTART\0", "little")
SI_MAGIC = 0x00
SI_ABI_VERSION = 0x08
SI_RAM_BYTES = 0x10
SI_SHARED_PAGE = 0x18
SI_HYPERCALL_PAGE = 0x20
SI_PT_ROOT = 0x28
SI_STACK_TOP = 0x30
SI_FLAGS = 0x38            # bit 0: started paravirtualized
SI_CMDLINE = 0x100         # NUL-terminated, at most CMDLINE_MAX bytes with the NUL
CMDLINE_MAX = 0x400

# shared page
SH_UPCALL_MASK = 0x000     # u8: 1 = virtual interrupts masked (IF clear)
SH_UPCALL_PENDING = 0x001  # u8: 1 = an event waits for delivery
SH_CR0 = 0x008             # u64 each: virtual control registers, read without exiting
SH_CR2 = 0x010
SH_CR3 = 0x018
SH_CR4 = 0x020
SH_GDTR = 0x028            # 10 bytes, as `sgdt` stores them: u16 limit, u64 base
SH_IDTR = 0x038            # 10 bytes, as `sidt` stores them
SH_HC_VALUE = 0x048        # u64: second result of RDMSR
SH_TIME = 0x050            # u64: virtual TSC at the last exit (informational)
SH_MC_COUNT = 0x100        # u32: number of queued multicall entries
SH_MC_ENTRIES = 0x200      # MC_MAX entries of MC_ENTRY_SIZE bytes
MC_ENTRY_SIZE = 40         # u64 nr, u64 arg0, u64 arg1, u64 arg2, u64 result
MC_MAX = 64

# -- hypercalls ---------------------------------------------------------------------
# call HYPERCALL_PAGE + nr * HYPERCALL_STRIDE with arguments in rdi, rsi,
# rdx, r10, r8; the result comes back in rax (>= 0 success, -errno failure).
# rax, rcx and r11 are clobbered; everything else is preserved.
HYPERCALL_STRIDE = 32
HYPERCALL_INSN = "syscall"   # what enters the hypervisor, in each stub the runtime writes

HC_CONSOLE_WRITE = 0     # (buf, len) -> len
HC_SHUTDOWN = 1          # (status) -> does not return
HC_SET_PTE = 2           # (pte_ptr, value) -> 0
HC_INVLPG = 3            # (va) -> 0
HC_NEW_BASEPTR = 4       # (cr3) -> 0; validates and pins the new hierarchy
HC_WRITE_CR = 5          # (n in {0, 4}, value) -> 0
HC_SET_GDT = 6           # (ptr to 10-byte descriptor) -> 0
HC_SET_TRAP_TABLE = 7    # (ptr to 10-byte descriptor of a 64-bit IDT) -> 0
HC_RDMSR = 8             # (msr) -> 0, value in shared page SH_HC_VALUE
HC_WRMSR = 9             # (msr, value) -> 0
HC_CPUID = 10            # (leaf, out ptr to u32[4]) -> 0
HC_IO_IN = 11            # (port, size in {1,2,4}) -> value
HC_IO_OUT = 12           # (port, size, value) -> 0
HC_BLOCK = 13            # () -> 0; sleeps until an event is pending (hlt)
HC_RDTSC = 14            # () -> virtual TSC
HC_WBINVD = 15           # () -> 0
HC_MULTICALL = 16        # () -> entries run; runs and empties the shared-page queue
HC_EVENT_CHECK = 17      # () -> 0; deliver pending events now (after unmasking)
HC_IRET = 18             # () -> does not return; pops an interrupt frame (see docs/abi.md)
HC_SET_TIMER = 19        # (deadline in virtual ns, 0 = cancel) -> 0
HC_STACK_SWITCH = 20     # (sp) -> 0; the kernel stack for the next entry from user mode (Xen's stack_switch)
HC_SET_SYSCALL_ENTRY = 21  # (address) -> 0; where a user-mode `syscall` enters the kernel (Xen's syscall callback)
HC_COUNT = 22

HYPERCALL_NAMES = {v: k[3:].lower() for k, v in dict(globals()).items()
                   if k.startswith("HC_") and k != "HC_COUNT"}
# Each hypercall's arguments, in register order (rdi, rsi, rdx, r10, r8).
HYPERCALL_ARGS: dict[int, tuple[str, ...]] = {
    HC_CONSOLE_WRITE: ("buf", "len"), HC_SHUTDOWN: ("status",), HC_SET_PTE: ("pte_ptr", "value"),
    HC_INVLPG: ("va",), HC_NEW_BASEPTR: ("cr3",), HC_WRITE_CR: ("n", "value"), HC_SET_GDT: ("desc",),
    HC_SET_TRAP_TABLE: ("desc",), HC_RDMSR: ("msr",), HC_WRMSR: ("msr", "value"), HC_CPUID: ("leaf", "out"),
    HC_IO_IN: ("port", "size"), HC_IO_OUT: ("port", "size", "value"), HC_BLOCK: (), HC_RDTSC: (),
    HC_WBINVD: (), HC_MULTICALL: (), HC_EVENT_CHECK: (), HC_IRET: (), HC_SET_TIMER: ("deadline",),
    HC_STACK_SWITCH: ("sp",), HC_SET_SYSCALL_ENTRY: ("address",),
}
BATCHABLE = (HC_SET_PTE, HC_INVLPG, HC_IO_OUT, HC_NEW_BASEPTR, HC_STACK_SWITCH)   # allowed in a multicall entry

EPERM = 1
EFAULT = 14
EINVAL = 22
ENOSYS = 38


def hypercall_stub(nr: int) -> bytes:
    """The bytes the runtime writes at HYPERCALL_PAGE + nr*32:
    mov eax, nr; syscall; pop rcx; and rcx, -32; jmp rcx (a masked return), then int3.

    The iret entry, reached by a jump, first saves what `mov eax` and `syscall`
    overwrite, as Xen's does: push rcx; push r11; push rax; mov eax, nr;
    syscall; ud2 (it never resumes: the hypervisor pops those three, then the frame)."""
    if nr == HC_IRET:
        code = b"\x51" + b"\x41\x53" + b"\x50" + b"\xb8" + struct.pack("<I", nr) + b"\x0f\x05" + b"\x0f\x0b"
    else:
        code = b"\xb8" + struct.pack("<I", nr) + b"\x0f\x05" + b"\x59" + b"\x48\x83\xe1\xe0" + b"\xff\xe1"
    return code + b"\xcc" * (HYPERCALL_STRIDE - len(code))


def hypercall_resume(nr: int) -> int:
    """Where hypercall `nr` resumes in its stub (an offset): the instruction after the syscall."""
    return hypercall_stub(nr).index(b"\x0f\x05") + 2


# Where a returning hypercall resumes in its stub (the same offset in every stub but iret's).
HYPERCALL_RESUME = hypercall_resume(HC_CONSOLE_WRITE)
IRET_SAVED = ("rax", "r11", "rcx")   # what the iret entry pushes, lowest address first, above the frame


# -- the .pv.sites table -----------------------------------------------------------
# header: magic[8] "PVSITES\0", u32 version, u32 count, u32 strings offset,
# u32 strings size; then `count` records; then a string table (NUL-terminated
# UTF-8, offset 0 is the empty string).
SITES_SECTION = ".pv.sites"
SITES_MAGIC = b"PVSITES\0"
SITES_VERSION = 2
_HEADER = struct.Struct("<8sIIII")
_RECORD = struct.Struct("<QIHHIII")   # address, length, op, kind, line, file str, becomes str

# A record's kind: what stands at the site.
SITE_NATIVE = 0          # the sensitive instruction itself (a native build, or boot code)
SITE_NO_EXIT = 1         # a paravirtual form that never leaves the guest (shared-page access)
SITE_HYPERCALL = 2       # a paravirtual form that makes a hypercall
SITE_BATCHED = 3         # an append to the multicall queue: an upcall must wait until it ends
SITE_KINDS = {SITE_NATIVE: "native", SITE_NO_EXIT: "no-exit", SITE_HYPERCALL: "hypercall",
              SITE_BATCHED: "batched"}

# The operation a site stands for.  Numbers are stored in images: never
# renumber, only add.
SITE_OPS: dict[int, str] = {
    0: "cli", 1: "sti", 2: "hlt", 3: "save_flags", 4: "restore_flags",
    5: "outb", 6: "outw", 7: "outl", 8: "inb", 9: "inw", 10: "inl",
    11: "read_cr0", 12: "read_cr2", 13: "read_cr3", 14: "read_cr4",
    15: "write_cr0", 16: "write_cr3", 17: "write_cr4",
    18: "invlpg", 19: "set_pte", 20: "lgdt", 21: "lidt", 22: "sgdt", 23: "sidt",
    24: "rdmsr", 25: "wrmsr", 26: "cpuid", 27: "rdtsc", 28: "wbinvd",
    29: "pause", 30: "swtch", 31: "iret",
    32: "syscall", 33: "set_kernel_stack", 34: "load_tr", 35: "enter_user",
}
OP_NUMBERS: dict[str, int] = {name: n for n, name in SITE_OPS.items()}


@dataclass
class Site:
    address: int
    length: int
    op: int             # a key of SITE_OPS
    kind: int           # SITE_NATIVE, SITE_NO_EXIT, SITE_HYPERCALL or SITE_BATCHED
    file: str
    line: int
    becomes: str = ""   # pv: what the operation became, in words

    @property
    def rewritten(self) -> bool:
        """A paravirtual replacement, not the sensitive instruction itself."""
        return self.kind != SITE_NATIVE

    @property
    def batched(self) -> bool:
        return self.kind == SITE_BATCHED

    @property
    def op_name(self) -> str:
        return SITE_OPS.get(self.op, f"op{self.op}")


def pack_sites(sites: list[Site]) -> bytes:
    strings = bytearray(b"\0")
    offsets: dict[str, int] = {"": 0}

    def intern(s: str) -> int:
        if s not in offsets:
            offsets[s] = len(strings)
            strings.extend(s.encode() + b"\0")
        return offsets[s]

    records = b"".join(
        _RECORD.pack(s.address, s.length, s.op, s.kind, s.line, intern(s.file), intern(s.becomes))
        for s in sites)
    str_off = _HEADER.size + len(records)
    return _HEADER.pack(SITES_MAGIC, SITES_VERSION, len(sites), str_off, len(strings)) + records + bytes(strings)


def unpack_sites(blob: bytes) -> list[Site]:
    """Parse a .pv.sites section; raises ValueError on anything malformed."""
    if len(blob) < _HEADER.size:
        raise ValueError("truncated .pv.sites header")
    magic, version, count, str_off, str_size = _HEADER.unpack_from(blob)
    if magic != SITES_MAGIC or version != SITES_VERSION:
        raise ValueError("bad .pv.sites magic or version")
    if _HEADER.size + count * _RECORD.size > str_off or str_off + str_size > len(blob):
        raise ValueError("truncated .pv.sites table")
    strings = blob[str_off:str_off + str_size]

    def string(off: int) -> str:
        end = strings.find(b"\0", off)
        if off >= len(strings) or end < 0:
            raise ValueError("bad string offset in .pv.sites")
        return strings[off:end].decode(errors="replace")

    sites = []
    for k in range(count):
        addr, length, op, kind, line, file_off, becomes_off = _RECORD.unpack_from(blob, _HEADER.size + k * _RECORD.size)
        if kind not in SITE_KINDS:
            raise ValueError(f"unknown site kind {kind} in .pv.sites")
        sites.append(Site(addr, length, op, kind, string(file_off), line, string(becomes_off)))
    return sites

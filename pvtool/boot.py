"""Boot code: the routines the linker places first in `.text`.

Native images are booted two ways: QEMU enters `_start32` through the Xen
PVH note (32-bit protected mode, paging off), and the bundled runtime
enters `_start` directly in 64-bit mode with its own page tables.  PV images
are only ever entered at `_start` and contain no sensitive instruction:
they shut down through the hypercall page.

    _start32  (native, 32-bit)  zero and fill identity page tables for the
              first GiB (2 MiB pages), load a GDT, turn on PAE, LME and
              paging, far-jump to _start64
    _start64  (native, 64-bit)  load the data segments, jump to _start
    _start    (64-bit, e_entry) own stack, zero .bss, call kmain, exit
              with its result

Memory layout.  The page tables and the boot stack live in `.bss` but
*before* `__bss_start`, so `_start` never zeroes them: they are live while
it runs (the page tables when booted through PVH, the stack always).
`_start32` zeroes the page tables itself before filling them.

`_start32` and `_start64` are hand-encoded (32-bit code and segment loads,
which the back end's encoder does not have); each instruction's mnemonic
stands beside its bytes.  `_start` goes through the encoder (x86/encode.py),
so in a bundled image it obeys the PV code rules like every function.
Absolute addresses and calls are relocations the linker resolves.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvimage import abi
from .ir import Data, DataReloc
from .obj import ABS32, PC32, FunctionCode, Reloc, SiteRow
from .x86.encode import BUNDLE, RAX, RCX, RDI, RDX, RSP, Asm, Mem

STACK_SIZE = 64 * 1024
EFER = 0xC0000080
EFER_LME = 1 << 8
CR4_PAE = 1 << 5
CR0_PE_PG = 0x80000001
PDE_LARGE = 0x83          # present, writable, 2 MiB page
PTE_TABLE = 0x03          # present, writable
DEBUG_EXIT_PORT = 0xF4    # QEMU's isa-debug-exit, as the runtime wires it too

# The GDT of the boot contract (null, 64-bit code 0x08, data 0x10), so a native
# image sees the same segments on QEMU as on the runtime.
GDT = abi.BOOT_GDT_ENTRIES


@dataclass
class BootCode:
    functions: list[FunctionCode]
    rodata: list[Data]
    scratch: list[Data]     # .bss objects placed before __bss_start, never zeroed


@dataclass(frozen=True)
class _Field:
    """A 4-byte relocated field (or a rel8 to a local label when kind is 'rel8')."""
    kind: str
    symbol: str = ""
    addend: int = 0


def abs32(symbol: str, addend: int = 0) -> _Field:
    return _Field(ABS32, symbol, addend)


def pc32(symbol: str, addend: int = 0) -> _Field:
    return _Field(PC32, symbol, addend)


def rel8(label: int) -> _Field:
    return _Field("rel8", addend=label)


def imm32(value: int) -> str:
    return struct.pack("<I", value & 0xFFFFFFFF).hex()


@dataclass
class _Asm:
    """Collects one routine: bytes, relocations and sensitive-site rows."""
    name: str
    code: bytearray = field(default_factory=bytearray)
    relocs: list[Reloc] = field(default_factory=list)
    sites: list[SiteRow] = field(default_factory=list)

    def here(self) -> int:
        return len(self.code)

    def ins(self, *parts: str | _Field, site: str | None = None) -> None:
        """One instruction from hex strings and fields; PC32/rel8 fields must come last."""
        start = len(self.code)
        pending = []
        for p in parts:
            if isinstance(p, str):
                self.code += bytes.fromhex(p)
            elif p.kind == "rel8":
                pending.append((len(self.code), p))
                self.code += b"\0"
            else:
                pending.append((len(self.code), p))
                self.code += b"\0" * 4
        end = len(self.code)
        for off, p in pending:
            if p.kind == "rel8":
                self.code[off] = (p.addend - end) & 0xFF
            else:
                # PC32 is relative to the end of the instruction, not of the field.
                bias = -(end - off) if p.kind == PC32 else 0
                self.relocs.append(Reloc(off, p.kind, p.symbol, p.addend + bias))
        if site:
            self.sites.append(SiteRow(start, end - start, site, None))

    def done(self) -> FunctionCode:
        return FunctionCode(self.name, bytes(self.code), self.relocs, [], self.sites)


def _start32() -> FunctionCode:
    a = _Asm("_start32")
    a.ins("fa", site="cli")                                   # cli
    a.ins("fc")                                               # cld
    a.ins("bf", abs32("__boot_pml4"))                         # mov edi, __boot_pml4
    a.ins("b9", imm32(3 * 4096 // 4))                         # mov ecx, 3072
    a.ins("31 c0")                                            # xor eax, eax
    a.ins("f3 ab")                                            # rep stosd
    a.ins("c7 05", abs32("__boot_pml4"), abs32("__boot_pdpt", PTE_TABLE))  # mov dword [pml4], pdpt|3
    a.ins("c7 05", abs32("__boot_pdpt"), abs32("__boot_pd", PTE_TABLE))    # mov dword [pdpt], pd|3
    a.ins("bf", abs32("__boot_pd"))                           # mov edi, __boot_pd
    a.ins("b8", imm32(PDE_LARGE))                             # mov eax, 0x83
    a.ins("b9", imm32(512))                                   # mov ecx, 512
    fill = a.here()
    a.ins("89 07")                                            # mov [edi], eax
    a.ins("05", imm32(2 << 20))                               # add eax, 0x200000
    a.ins("83 c7 08")                                         # add edi, 8
    a.ins("e2", rel8(fill))                                   # loop fill
    a.ins("0f 01 15", abs32("__boot_gdtr"), site="lgdt")      # lgdt [__boot_gdtr]
    a.ins("b8", imm32(CR4_PAE))                               # mov eax, CR4.PAE
    a.ins("0f 22 e0", site="write_cr4")                       # mov cr4, eax
    a.ins("b8", abs32("__boot_pml4"))                         # mov eax, __boot_pml4
    a.ins("0f 22 d8", site="write_cr3")                       # mov cr3, eax
    a.ins("b9", imm32(EFER))                                  # mov ecx, EFER
    a.ins("b8", imm32(EFER_LME))                              # mov eax, EFER.LME
    a.ins("31 d2")                                            # xor edx, edx
    a.ins("0f 30", site="wrmsr")                              # wrmsr
    a.ins("b8", imm32(CR0_PE_PG))                             # mov eax, CR0.PG|PE
    a.ins("0f 22 c0", site="write_cr0")                       # mov cr0, eax
    a.ins("ea", abs32("_start64"), f"{abi.KERNEL_CS:02x} 00")  # ljmp 0x08:_start64
    return a.done()


def _start64() -> FunctionCode:
    a = _Asm("_start64")
    a.ins("b8", imm32(abi.KERNEL_DS))                         # mov eax, 0x10
    a.ins("8e d8")                                            # mov ds, eax
    a.ins("8e c0")                                            # mov es, eax
    a.ins("8e d0")                                            # mov ss, eax
    a.ins("8e e0")                                            # mov fs, eax
    a.ins("8e e8")                                            # mov gs, eax
    a.ins("e9", pc32("_start"))                               # jmp _start
    return a.done()


def _start(target: str, bundled: bool) -> FunctionCode:
    """Written with the back end's encoder, so a bundled build's start-up code obeys
    the same code rules as the functions: kmain's masked return lands on the
    bundle start after its call."""
    a = Asm(bundled)
    sites: list[tuple[int, int, str]] = []

    def sensitive(op: str, emit) -> None:
        start = a.anchor()
        emit()
        sites.append((start, a.anchor(), op))

    if target == "native":
        sensitive("cli", a.cli)
    a.cld()
    a.lea(RSP, Mem(symbol="__boot_stack", disp=STACK_SIZE))
    a.lea(RDI, Mem(symbol="__bss_start"))
    a.lea(RCX, Mem(symbol="__bss_end"))
    a.sub(RCX, RDI)
    a.xor(RAX, RAX, size=4)
    a.rep_stosb()                                  # zero .bss
    a.call("kmain")
    if target == "native":
        a.mov(RDX, DEBUG_EXIT_PORT, size=2)
        sensitive("outb", lambda: a.out(1))        # exit with kmain's result
        a.label("halt")
        sensitive("cli", a.cli)
        sensitive("hlt", a.hlt)
        a.jmp("halt")
    else:
        a.label("down")
        a.mov(RDI, RAX, size=4)
        a.call("__hypercall_page", abi.HC_SHUTDOWN * abi.HYPERCALL_STRIDE)
        a.jmp("down")
    code = a.finish()
    rows = [SiteRow(*a.span(start, end), op, None) for start, end, op in sites]
    return FunctionCode("_start", code, a.relocs, [], rows, align=BUNDLE if bundled else 16)


def _page(name: str) -> Data:
    return Data(name, "bss", 4096, 4096)


def boot_code(target: str, bundled: bool = False) -> BootCode:
    """The boot routines and the boot data they use, for a 'native' or 'pv' image;
    `bundled` lays `_start` out by the PV code rules."""
    stack = Data("__boot_stack", "bss", STACK_SIZE, 4096)
    if target == "pv":
        return BootCode([_start("pv", bundled)], [], [stack])
    gdt = Data("__boot_gdt", "rodata", len(GDT), 8, GDT)
    gdtr = Data("__boot_gdtr", "rodata", 10, 8,
                struct.pack("<HQ", abi.BOOT_GDT_LIMIT, 0), [DataReloc(2, "__boot_gdt")])
    tables = [_page("__boot_pml4"), _page("__boot_pdpt"), _page("__boot_pd")]
    return BootCode([_start("native", bundled), _start32(), _start64()], [gdt, gdtr], tables + [stack])

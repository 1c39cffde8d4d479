"""The linker: places object code and data at final addresses and resolves relocations.

Input is the back end's `ObjectCode`; output is a `LinkedImage` (linked.py), a finished,
file-format-free picture of the guest's memory (sections with addresses and
bytes, symbols, line rows, sensitive sites, ELF notes, entry points) that
`pvtool.elf.write` turns into an ELF file.

Layout, from abi.LOAD_BASE up, each group starting on a fresh page so the
ELF writer can give it its own W^X segment:

    .text    [pv: __hypercall_page, 4 KiB of int3]  boot code  functions   R-X
    .rodata  boot GDT, string literals; then the note sections             R
    .data    initialised globals                                           RW
    .bss     boot page tables + boot stack | __bss_start  globals  __bss_end
    .user.text  user fns                                                   R-X
    .user.data  user vars, strings of user code                            RW

The user sections have PT_LOADs of their own, so a kernel can map exactly
their pages for CPL 3; USER_TEXT_START/END and USER_DATA_START/END are their
page-aligned bounds (equal, after the kernel's pages, when they are empty).

A bundled image (the PV code rules) has its functions on 32-byte bundles and
.text filled with int3 to the end of its last bundle.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from operator import attrgetter

from pvimage import abi

from . import boot, dwarf
from .diagnostics import CompileError
from .errors import InternalError
from .intrinsics import OP_NUMBERS
from .ir import Data
from .linked import LinkedImage, Note, Section, Symbol
from .obj import (ABS32, ABS32S, ABS64, LEAVING, PC32, RETURN_IN, RETURNED, FrameStep, FunctionCode,
                  ObjectCode)
from .source import Loc
from .x86.encode import BUNDLE

PAGE = abi.PAGE_SIZE
FILL = 0xCC                      # int3 between functions and in the hypercall page
HYPERCALL_PAGE = "__hypercall_page"
RCX_NUMBER = 1                   # rcx in x86 encodings: the hypercall stubs return through it
# The code model: rel32 branches and rip-relative operands reach +-2 GiB, the
# native boot code uses 32-bit absolute addresses.  An image that ends at or
# below 2 GiB is in reach of both.
IMAGE_LIMIT = 1 << 31
USER_BOUNDS = ("USER_TEXT_START", "USER_TEXT_END", "USER_DATA_START", "USER_DATA_END")


class LinkError(CompileError):
    """A program the linker cannot place (a name clash, an image beyond the
    code model's reach, ...): a user error, located at the program's item
    that caused it when there is one."""

    def __init__(self, message: str, loc: Loc | None = None):
        super().__init__(loc, message)


def _internal(message: str) -> InternalError:
    """Malformed object code: a bug in an earlier stage, not the program's fault."""
    return InternalError("link", message)


def align_up(n: int, a: int) -> int:
    return (n + a - 1) & -a


def _check_align(what: str, a: int) -> None:
    if a < 1 or a & (a - 1):
        raise _internal(f"{what}: alignment {a} is not a power of two")


@dataclass
class _Placed:
    """An item with its address, before its bytes are patched."""
    name: str
    addr: int
    size: int
    code: FunctionCode | None = None
    data: Data | None = None

    @property
    def loc(self) -> Loc | None:
        return (self.code or self.data).loc

    @property
    def kind(self) -> str:
        return "function" if self.code is not None else "global"


def _place(items: list[FunctionCode | Data], start: int) -> tuple[list[_Placed], int]:
    placed, addr = [], start
    for it in items:
        _check_align(it.name, it.align)
        addr = align_up(addr, it.align)
        if isinstance(it, FunctionCode):
            placed.append(_Placed(it.name, addr, len(it.code), code=it))
        else:
            placed.append(_Placed(it.name, addr, it.size, data=it))
        addr += placed[-1].size
    return placed, addr


def _check_data(d: Data) -> None:
    if d.section not in ("rodata", "data", "bss", "user"):
        raise _internal(f"data '{d.name}': unknown section '{d.section}'")
    if d.section == "bss" and (d.init or d.relocs):
        raise _internal(f"data '{d.name}': .bss object has an initialiser")
    if d.section != "bss" and len(d.init) != d.size:
        raise _internal(f"data '{d.name}': initialiser is {len(d.init)} bytes, size is {d.size}")


def _check_reach(placed: list[_Placed]) -> None:
    """The first item that pushes the image past IMAGE_LIMIT is the program's error."""
    for p in placed:
        end = p.addr + p.size
        if end > IMAGE_LIMIT:
            raise LinkError(f"{p.kind} '{p.name}' ({p.size} bytes) would end at {end:#x}; the image "
                            f"must fit below 2 GiB ({IMAGE_LIMIT:#x}), the reach of 32-bit offsets", p.loc)


# -- relocations ------------------------------------------------------------------

_FIELD = {PC32: ("<i", 4), ABS32: ("<I", 4), ABS32S: ("<i", 4), ABS64: ("<Q", 8)}


def _patch(buf: bytearray, p: _Placed, off: int, kind: str, symbol: str,
           addend: int, symbols: dict[str, int]) -> None:
    if kind not in _FIELD:
        raise _internal(f"{p.name}: unknown relocation kind '{kind}'")
    fmt, width = _FIELD[kind]
    if off < 0 or off + width > len(buf):
        raise _internal(f"{p.name}: {kind} relocation at offset {off:#x} is outside the object")
    if symbol not in symbols:
        raise LinkError(f"undefined symbol '{symbol}' (referenced from {p.name})", p.loc)
    value = symbols[symbol] + addend - (p.addr + off if kind == PC32 else 0)
    try:
        struct.pack_into(fmt, buf, off, value)
    except struct.error:
        raise LinkError(f"{p.name}+{off:#x}: {kind} relocation to '{symbol}' out of range ({value:#x})",
                        p.loc) from None


def _function_bytes(p: _Placed, symbols: dict[str, int]) -> bytes:
    buf = bytearray(p.code.code)
    for r in p.code.relocs:
        _patch(buf, p, r.offset, r.kind, r.symbol, r.addend, symbols)
    return bytes(buf)


def _data_bytes(p: _Placed, symbols: dict[str, int]) -> bytes:
    buf = bytearray(p.data.init)
    for r in p.data.relocs:
        _patch(buf, p, r.offset, ABS64, r.symbol, r.addend, symbols)
    return bytes(buf)


def _concat(placed: list[_Placed], start: int, end: int, render, fill: int) -> bytes:
    out = bytearray([fill]) * (end - start)
    for p in placed:
        out[p.addr - start:p.addr - start + p.size] = render(p)
    return bytes(out)


# -- notes ------------------------------------------------------------------------

def encode_note(n: Note) -> bytes:
    """One ELF note: namesz, descsz, type, then name and desc, each padded to 4 bytes."""
    name = n.owner.encode() + b"\0"
    pad = lambda b: b + b"\0" * (-len(b) % 4)
    return struct.pack("<III", len(name), len(n.desc), n.type) + pad(name) + pad(n.desc)


def _pvtool_notes(obj: ObjectCode, hypercall_page: int | None) -> list[Note]:
    u32 = lambda v: struct.pack("<I", v)
    pv = obj.target == "pv"
    notes = [Note(abi.NOTE_OWNER, abi.NOTE_ABI_VERSION, u32(abi.ABI_VERSION)),
             Note(abi.NOTE_OWNER, abi.NOTE_MODE, u32(abi.MODE_PV if pv else abi.MODE_NATIVE)),
             Note(abi.NOTE_OWNER, abi.NOTE_FEATURES,
                  u32(abi.FEATURE_MULTICALL | abi.FEATURE_EVENTS if pv else 0)),
             Note(abi.NOTE_OWNER, abi.NOTE_GUEST_NAME, obj.name.encode() + b"\0")]
    if pv:
        notes.append(Note(abi.NOTE_OWNER, abi.NOTE_HYPERCALL_PAGE, struct.pack("<Q", hypercall_page)))
    return notes


def _note_sections(groups: list[tuple[str, list[Note]]], start: int) -> tuple[list[Section], int]:
    sections, addr = [], start
    for name, notes in groups:
        addr = align_up(addr, 4)
        blob = b"".join(encode_note(n) for n in notes)
        sections.append(Section(name, addr, blob, len(blob), "note", "r", 4))
        addr += len(blob)
    return sections, addr


# -- debug rows and sites ----------------------------------------------------------

def _file_list(obj: ObjectCode) -> list[str]:
    files = list(obj.files)
    for f in obj.functions:
        for loc in [f.loc] + [r.loc for r in f.lines] + [s.loc for s in f.sites]:
            if loc is not None and loc.file not in files:
                files.append(loc.file)
    return files


_OFFSET = attrgetter("offset")


def _lines(text: list[_Placed]) -> list[dwarf.Row]:
    rows: list[dwarf.Row] = []
    for p in text:
        fn = p.code
        own = sorted(fn.lines, key=_OFFSET)
        for r in own[:1] + own[-1:]:                 # the lowest and the highest offset
            if not 0 <= r.offset <= p.size:
                raise _internal(f"{p.name}: line row at offset {r.offset:#x} is outside the function")
        if rows and (not own or own[0].offset != 0):
            # Line 0 = "no source": keeps this code from being charged to the previous function.
            rows.append(dwarf.Row(p.addr, rows[-1].file, 0))
        own = [dwarf.Row(p.addr + r.offset, r.loc.file, r.loc.line, r.loc.col) for r in own]
        if fn.body is not None and own:
            own = _mark_prologue_end(own, p.addr + fn.body)
        rows += own
    return rows


def _mark_prologue_end(rows: list[dwarf.Row], body: int) -> list[dwarf.Row]:
    """Flag the row where the body starts (adding one if the body continues a line): gdb
    puts a function's breakpoint there, after the frame is built."""
    at = next((k for k, r in enumerate(rows) if r.address >= body), len(rows))
    if at == len(rows) or rows[at].address != body:
        if at == 0:
            return rows
        before = rows[at - 1]
        rows.insert(at, dwarf.Row(body, before.file, before.line, before.col))
    rows[at].prologue_end = True
    return rows


def _debug_function(p: _Placed) -> dwarf.Func:
    fn = p.code
    variables = [dwarf.Variable(v.name, v.type, v.param,
                                [(p.addr + start, p.addr + end, reg, offset) for start, end, reg, offset in v.places],
                                v.line) for v in fn.variables]
    return dwarf.Func(fn.source_name or p.name, p.addr, p.addr + p.size, fn.loc.file, fn.loc.line, fn.result,
                      variables)


def _stub_frames() -> list[FrameStep]:
    """The runtime's hypercall stubs (pvimage.abi.hypercall_stub): the caller's frame until
    the `pop rcx` after the syscall, then a masked return through rcx."""
    popped = abi.HYPERCALL_RESUME + 1
    steps = []
    for nr in range(abi.HC_COUNT):
        stub = nr * abi.HYPERCALL_STRIDE
        steps += [FrameStep(stub, LEAVING), FrameStep(stub + popped, RETURN_IN, RCX_NUMBER),
                  FrameStep(stub + abi.HYPERCALL_STRIDE, RETURNED)]
    return steps


def _frames(text: list[_Placed], boot: list[FunctionCode]) -> list[dwarf.Frame]:
    """What the unwinder needs: each function's frame steps; the boot code has no caller."""
    frames = []
    for p in text:
        fn = p.code
        entered_by = "outermost" if any(fn is b for b in boot) else fn.entered_by
        if not entered_by:
            continue
        for step in fn.frame:
            if not 0 <= step.offset <= p.size:
                raise _internal(f"{p.name}: frame step at offset {step.offset:#x} is outside the function")
        frames.append(dwarf.Frame(p.addr, p.addr + p.size, entered_by,
                                  [(p.addr + s.offset, s.event, s.reg, s.value) for s in fn.frame]))
    return frames


def _sites(text: list[_Placed], target: str) -> list[abi.Site]:
    sites = []
    for p in text:
        for s in p.code.sites:
            if s.op not in OP_NUMBERS:
                raise _internal(f"{p.name}: unknown operation '{s.op}' in site table")
            if s.offset < 0 or s.length < 0 or s.offset + s.length > p.size:
                raise _internal(f"{p.name}: site at offset {s.offset:#x} is outside the function")
            sites.append(abi.Site(p.addr + s.offset, s.length, OP_NUMBERS[s.op], s.kind,
                                  s.loc.file if s.loc else "", s.loc.line if s.loc else 0, s.becomes))
    return sorted(sites, key=lambda s: s.address)


# -- the linker -------------------------------------------------------------------

@dataclass
class _Symbols:
    """Name -> address for relocation, plus the symbol table entries."""
    addr: dict[str, int] = field(default_factory=dict)
    table: list[Symbol] = field(default_factory=list)
    locs: dict[str, Loc | None] = field(default_factory=dict)

    def define(self, name: str, addr: int, size: int, kind: str, section: str, loc: Loc | None = None) -> None:
        if name in self.addr:
            first = self.locs[name]
            if first is None or loc is None:     # one of the two is the linker's own
                raise LinkError(f"'{name}' is a name the linker reserves", first or loc)
            raise LinkError(f"'{name}' is defined twice (first at {first})", loc)
        self.addr[name] = addr
        self.locs[name] = loc
        self.table.append(Symbol(name, addr, size, kind, section))

    def define_all(self, placed: list[_Placed], kind: str, section: str) -> None:
        for p in placed:
            self.define(p.name, p.addr, p.size, kind, section, p.loc)


def _max_align(placed: list[_Placed]) -> int:
    return max([1] + [(p.code or p.data).align for p in placed])


def _section(name: str, placed: list[_Placed], start: int, end: int, perm: str,
             render, fill: int = 0, segment: str = "") -> Section:
    blob = _concat(placed, start, end, render, fill)
    return Section(name, start, blob, end - start, "progbits", perm, _max_align(placed), segment)


def _code_end(end: int, bundled: bool) -> int:
    """Bundled code is filled with int3 to the end of its last bundle: every bundle decodes whole."""
    return align_up(end, BUNDLE) if bundled else end


def link(obj: ObjectCode) -> LinkedImage:
    """Place `obj` (plus boot code) from abi.LOAD_BASE on and resolve every relocation."""
    if obj.target not in ("native", "pv"):
        raise _internal(f"unknown target '{obj.target}' (expected 'native' or 'pv')")
    for d in obj.data:
        _check_data(d)
    bc = boot.boot_code(obj.target, obj.bundled)
    in_section = lambda s: [d for d in obj.data if d.section == s]
    page = [FunctionCode(HYPERCALL_PAGE, bytes([FILL]) * PAGE, align=PAGE, entered_by="call",
                         frame=_stub_frames())] if obj.target == "pv" else []
    syms = _Symbols()

    kernel_fns = [f for f in obj.functions if not f.user]
    text, text_end = _place(page + bc.functions + kernel_fns, abi.LOAD_BASE)
    text_end = _code_end(text_end, obj.bundled)
    rodata_start = align_up(text_end, PAGE)
    rodata, rodata_end = _place(bc.rodata + in_section("rodata"), rodata_start)
    syms.define_all(text, "func", ".text")
    syms.define_all(rodata, "object", ".rodata")

    # The notes need final addresses of text symbols, which are known by now.
    hc_page = syms.addr.get(HYPERCALL_PAGE)
    groups = [(".note.pvtool", _pvtool_notes(obj, hc_page))]
    if obj.target == "native":
        entry32 = struct.pack("<I", syms.addr["_start32"])
        groups.append((".note.xen", [Note(abi.XEN_NOTE_OWNER, abi.XEN_ELFNOTE_PHYS32_ENTRY, entry32)]))
    notes, notes_end = _note_sections(groups, rodata_end)

    data_start = align_up(notes_end, PAGE)
    data, data_end = _place(in_section("data"), data_start)
    scratch, scratch_end = _place(bc.scratch, data_end)
    bss, bss_end = _place(in_section("bss"), scratch_end)
    syms.define_all(data, "object", ".data")
    syms.define_all(scratch + bss, "object", ".bss")
    syms.define("__bss_start", scratch_end, 0, "notype", ".bss")
    syms.define("__bss_end", bss_end, 0, "notype", ".bss")

    utext_start = align_up(bss_end, PAGE)
    utext, utext_end = _place([f for f in obj.functions if f.user], utext_start)
    utext_end = _code_end(utext_end, obj.bundled)
    udata_start = align_up(utext_end, PAGE)
    udata, udata_end = _place(in_section("user"), udata_start)
    syms.define_all(utext, "func", ".user.text")
    syms.define_all(udata, "object", ".user.data")
    bounds = (utext_start, udata_start, udata_start, align_up(udata_end, PAGE))
    for name, addr in zip(USER_BOUNDS, bounds):
        syms.define(name, addr, 0, "notype", ".user.data" if udata else ".bss")
    _check_reach(text + rodata + data + scratch + bss + utext + udata)

    code = lambda p: _function_bytes(p, syms.addr)
    init = lambda p: _data_bytes(p, syms.addr)
    bss_start = scratch[0].addr
    sections = [_section(".text", text, abi.LOAD_BASE, text_end, "rx", code, FILL),
                _section(".rodata", rodata, rodata_start, rodata_end, "r", init),
                *notes,
                _section(".data", data, data_start, data_end, "rw", init),
                Section(".bss", bss_start, b"", bss_end - bss_start, "nobits", "rw", _max_align(scratch + bss))]
    if utext:
        sections.append(_section(".user.text", utext, utext_start, utext_end, "rx", code, FILL, "user text"))
    if udata:
        sections.append(_section(".user.data", udata, udata_start, udata_end, "rw", init, 0, "user data"))
    return LinkedImage(
        name=obj.name, target=obj.target, entry=syms.addr["_start"],
        entry32=syms.addr.get("_start32"), hypercall_page=hc_page,
        sections=sections, symbols=syms.table, files=_file_list(obj),
        lines=_lines(text + utext), frames=_frames(text + utext, bc.functions),
        sites=_sites(text + utext, obj.target),
        funcs=[_debug_function(p) for p in text + utext if p.code.loc is not None],
        variables=[dwarf.Global(p.name, p.data.type, p.addr, p.loc.file, p.loc.line)
                   for p in data + bss + udata if p.data.type is not None and p.loc is not None],
        notes=[n for _, group in groups for n in group])

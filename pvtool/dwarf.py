"""DWARF debug information: `.debug_line`, the one compile unit that points at it, `.debug_frame`.

binutils, gdb and pyelftools only consult a line table through a compile
unit in `.debug_info`, so besides the line program this module writes a
minimal `DW_TAG_compile_unit` (stmt_list, low_pc/high_pc) with one
`DW_TAG_subprogram` per source function.  Everything is DWARF version 4,
32-bit format, 8-byte addresses; the line program is one sequence from the
first row to the end of `.text`.  A row may carry `prologue_end`: gdb
places a function's breakpoint there, once the frame is built.

`.debug_frame` tells a debugger how to unwind each function (`Frame`):
functions keep rbp frames, but padded bundled code hides `push rbp` from
gdb's own prologue reader, and epilogues and masked returns move the
frame's base instruction by instruction.  A function entered by a call
starts with its return address at [rsp]; an interrupt handler with the
five-qword interrupt frame there (gdb then looks up the interrupted
code at its address less one, as for a call: right unless the interrupt
came at a function's first instruction); the boot code is outermost (its
return address is undefined, so a backtrace ends there).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

VERSION = 4
LINE_BASE = -5
LINE_RANGE = 14
OPCODE_BASE = 13
STD_OPCODE_LENGTHS = bytes([0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1])

# standard and extended line opcodes
DW_LNS_copy, DW_LNS_advance_pc, DW_LNS_advance_line, DW_LNS_set_file, DW_LNS_set_column = 1, 2, 3, 4, 5
DW_LNS_set_prologue_end = 10
DW_LNE_end_sequence, DW_LNE_set_address = 1, 2

# tags, attributes, forms
DW_TAG_compile_unit, DW_TAG_subprogram = 0x11, 0x2E
DW_AT_name, DW_AT_stmt_list, DW_AT_low_pc, DW_AT_high_pc = 0x03, 0x10, 0x11, 0x12
DW_AT_language, DW_AT_comp_dir, DW_AT_producer = 0x13, 0x1B, 0x25
DW_AT_decl_file, DW_AT_decl_line, DW_AT_external = 0x3A, 0x3B, 0x3F
DW_FORM_addr, DW_FORM_string, DW_FORM_udata, DW_FORM_sec_offset, DW_FORM_flag_present = 0x01, 0x08, 0x0F, 0x17, 0x19
DW_LANG_C99 = 0x0C

PRODUCER = "pvtool"


@dataclass(slots=True)
class Row:
    """Code from `address` on comes from file:line:col (file is a path from the image's file list)."""
    address: int
    file: str
    line: int
    col: int = 0
    prologue_end: bool = False


@dataclass
class Frame:
    """A function's frame for the unwinder: how it was entered, and where the frame changes.

    `entered_by`: 'call', 'interrupt' or 'outermost'; `steps`: (address, event, x86 register)
    with the events of pvtool.obj (PUSHED_RBP ... RETURNED), in address order."""
    low: int
    high: int
    entered_by: str
    steps: list[tuple[int, str, int]]


@dataclass
class Func:
    name: str
    low: int
    high: int
    file: str
    line: int


def uleb(n: int) -> bytes:
    if 0 <= n < 0x80:
        return _BYTES[n]
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


_BYTES = [bytes((n,)) for n in range(256)]


def sleb(n: int) -> bytes:
    if -0x40 <= n < 0x40:
        return _BYTES[n & 0x7F]
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


def _cstr(s: str) -> bytes:
    return s.encode() + b"\0"


def _file_table(files: list[str]) -> tuple[bytes, bytes]:
    """include_directories and file_names; file k (0-based) is DWARF file k+1."""
    dirs: list[str] = []
    names = bytearray()
    for path in files:
        head, tail = os.path.split(path)
        if head and head not in dirs:
            dirs.append(head)
        index = dirs.index(head) + 1 if head else 0
        names += _cstr(tail or path) + uleb(index) + uleb(0) + uleb(0)
    return b"".join(_cstr(d) for d in dirs) + b"\0", bytes(names) + b"\0"


def _program(rows: list[Row], files: list[str], end: int) -> bytes:
    if not rows:
        return b""
    rows = sorted(rows, key=lambda r: r.address)
    index = {f: k + 1 for k, f in enumerate(files)}
    out = bytearray([0]) + uleb(9) + bytes([DW_LNE_set_address]) + struct.pack("<Q", rows[0].address)
    addr, file, line, col = rows[0].address, 1, 1, 0
    special_lines = range(LINE_BASE, LINE_BASE + LINE_RANGE)
    for r in rows:                     # one row each: keep it to byte operations
        if index[r.file] != file:
            file = index[r.file]
            out.append(DW_LNS_set_file)
            out += uleb(file)
        if r.col != col:
            col = r.col
            out.append(DW_LNS_set_column)
            out += uleb(col)
        if r.prologue_end:
            out.append(DW_LNS_set_prologue_end)
        addr_delta, line_delta = r.address - addr, r.line - line
        opcode = (line_delta - LINE_BASE) + LINE_RANGE * addr_delta + OPCODE_BASE
        if line_delta in special_lines and opcode <= 255:
            out.append(opcode)         # a special opcode: advance both and append a row
        else:
            if line_delta:
                out.append(DW_LNS_advance_line)
                out += sleb(line_delta)
            if addr_delta:
                out.append(DW_LNS_advance_pc)
                out += uleb(addr_delta)
            out.append(DW_LNS_copy)
        addr, line = r.address, r.line
    if end > addr:
        out += bytes([DW_LNS_advance_pc]) + uleb(end - addr)
    return bytes(out + bytes([0]) + uleb(1) + bytes([DW_LNE_end_sequence]))


def debug_line(rows: list[Row], files: list[str], end: int) -> bytes:
    """A .debug_line section: one version-4 unit, one sequence ending at `end`."""
    dirs, names = _file_table(files)
    header = (bytes([1, 1, 1]) + struct.pack("<bBB", LINE_BASE, LINE_RANGE, OPCODE_BASE)
              + STD_OPCODE_LENGTHS + dirs + names)
    after_length = struct.pack("<HI", VERSION, len(header)) + header + _program(rows, files, end)
    return struct.pack("<I", len(after_length)) + after_length


def _abbrev() -> bytes:
    cu = [(DW_AT_producer, DW_FORM_string), (DW_AT_language, 0x05), (DW_AT_name, DW_FORM_string),
          (DW_AT_comp_dir, DW_FORM_string), (DW_AT_stmt_list, DW_FORM_sec_offset),
          (DW_AT_low_pc, DW_FORM_addr), (DW_AT_high_pc, DW_FORM_addr)]
    sub = [(DW_AT_name, DW_FORM_string), (DW_AT_external, DW_FORM_flag_present),
           (DW_AT_decl_file, DW_FORM_udata), (DW_AT_decl_line, DW_FORM_udata),
           (DW_AT_low_pc, DW_FORM_addr), (DW_AT_high_pc, DW_FORM_addr)]

    def entry(code: int, tag: int, children: bool, attrs: list[tuple[int, int]]) -> bytes:
        body = b"".join(uleb(a) + uleb(f) for a, f in attrs)
        return uleb(code) + uleb(tag) + bytes([children]) + body + b"\0\0"
    return entry(1, DW_TAG_compile_unit, True, cu) + entry(2, DW_TAG_subprogram, False, sub) + b"\0"


def _info(files: list[str], funcs: list[Func], low: int, high: int, comp_dir: str) -> bytes:
    index = {f: k + 1 for k, f in enumerate(files)}
    die = (uleb(1) + _cstr(PRODUCER) + struct.pack("<H", DW_LANG_C99) + _cstr(files[0] if files else "")
           + _cstr(comp_dir) + struct.pack("<IQQ", 0, low, high))
    for f in funcs:
        die += (uleb(2) + _cstr(f.name) + uleb(index.get(f.file, 0)) + uleb(f.line)
                + struct.pack("<QQ", f.low, f.high))
    die += b"\0"
    after_length = struct.pack("<HIB", VERSION, 0, 8) + die
    return struct.pack("<I", len(after_length)) + after_length


# -- call-frame information ---------------------------------------------------------------

DW_CFA_advance_loc, DW_CFA_offset, DW_CFA_restore = 0x40, 0x80, 0xC0
DW_CFA_advance_loc1, DW_CFA_advance_loc2, DW_CFA_advance_loc4 = 0x02, 0x03, 0x04
DW_CFA_undefined, DW_CFA_register, DW_CFA_remember_state, DW_CFA_restore_state = 0x07, 0x09, 0x0A, 0x0B
DW_CFA_def_cfa, DW_CFA_def_cfa_register, DW_CFA_def_cfa_offset = 0x0C, 0x0D, 0x0E
DATA_ALIGN = -8
# DWARF numbers of the x86-64 registers (psABI), by the registers' x86 encoding 0-15
DWARF_REG = (0, 2, 1, 3, 7, 6, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15)
RSP, RBP, RA, RFLAGS, CS, SS = 7, 6, 16, 49, 51, 52
# Where the caller's state is, relative to the CFA, on entry
ENTRY = {"call": (8, {RA: 8}),
         "interrupt": (40, {RA: 40, CS: 32, RFLAGS: 24, RSP: 16, SS: 8})}   # rip cs rflags rsp ss


def _saved(reg: int, below_cfa: int) -> bytes:
    return bytes([DW_CFA_offset | reg]) + uleb(below_cfa // -DATA_ALIGN)


def _advance(delta: int) -> bytes:
    if delta < 0x40:
        return bytes([DW_CFA_advance_loc | delta])
    if delta < 0x100:
        return bytes([DW_CFA_advance_loc1, delta])
    if delta < 0x10000:
        return bytes([DW_CFA_advance_loc2]) + struct.pack("<H", delta)
    return bytes([DW_CFA_advance_loc4]) + struct.pack("<I", delta)


def _cie(entered_by: str) -> bytes:
    cfa, saved = ENTRY[entered_by]
    body = (struct.pack("<IB", 0xFFFFFFFF, VERSION) + b"\0" + bytes([8, 0]) + uleb(1) + sleb(DATA_ALIGN)
            + uleb(RA) + bytes([DW_CFA_def_cfa]) + uleb(RSP) + uleb(cfa)
            + b"".join(_saved(reg, below) for reg, below in saved.items()))
    return _padded(body)


def _padded(body: bytes) -> bytes:
    body += b"\0" * (-(len(body) + 4) % 8)          # DW_CFA_nop to the address size
    return struct.pack("<I", len(body)) + body


def _frame_program(frame: Frame) -> bytes:
    """The call-frame instructions for one function's steps (events of pvtool.obj)."""
    if frame.entered_by == "outermost":
        return bytes([DW_CFA_undefined]) + uleb(RA)
    entry = ENTRY[frame.entered_by][0]
    out, at, cfa, pushed = bytearray(), frame.low, entry, []
    for address, event, reg in frame.steps:
        if address >= frame.high:
            break
        if address > at:
            out += _advance(address - at)
            at = address
        match event:
            case "pushed rbp":
                cfa += 8
                out += bytes([DW_CFA_def_cfa_offset]) + uleb(cfa) + _saved(RBP, cfa)
            case "rbp frame":
                out += bytes([DW_CFA_def_cfa_register]) + uleb(RBP)
            case "saved":
                pushed.append(DWARF_REG[reg])
                out += _saved(DWARF_REG[reg], cfa + 8 * len(pushed))
            case "leaving":
                out.append(DW_CFA_remember_state)
            case "popped rbp":
                out += bytes([DW_CFA_def_cfa]) + uleb(RSP) + uleb(entry)
                out += bytes(DW_CFA_restore | r for r in [RBP] + pushed)
            case "return address in":
                out += bytes([DW_CFA_def_cfa_offset]) + uleb(0)
                out += bytes([DW_CFA_register]) + uleb(RA) + uleb(DWARF_REG[reg])
            case "returned":
                out.append(DW_CFA_restore_state)
            case _:
                raise ValueError(f"unknown frame event {event!r}")
    return bytes(out)


def debug_frame(frames: list[Frame]) -> bytes:
    """A .debug_frame section: a CIE per way of entering a function, an FDE per function."""
    out, cies = bytearray(), {}
    for kind in sorted({"call" if f.entered_by == "outermost" else f.entered_by for f in frames}):
        cies[kind] = len(out)
        out += _cie(kind)
    for f in frames:
        cie = cies["call" if f.entered_by == "outermost" else f.entered_by]
        out += _padded(struct.pack("<IQQ", cie, f.low, f.high - f.low) + _frame_program(f))
    return bytes(out)


def debug_sections(rows: list[Row], funcs: list[Func], files: list[str], low: int, high: int,
                   comp_dir: str, frames: list[Frame] | None = None) -> dict[str, bytes]:
    """The .debug_abbrev, .debug_info, .debug_line (and .debug_frame) contents for code in [low, high)."""
    sections = {".debug_abbrev": _abbrev(),
                ".debug_info": _info(files, funcs, low, high, comp_dir),
                ".debug_line": debug_line(rows, files, high)}
    if frames:
        sections[".debug_frame"] = debug_frame(frames)
    return sections

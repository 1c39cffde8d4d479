"""DWARF debug information: `.debug_line`, plus the one compile unit that points at it.

binutils, gdb and pyelftools only consult a line table through a compile
unit in `.debug_info`, so besides the line program this module writes a
minimal `DW_TAG_compile_unit` (stmt_list, low_pc/high_pc) with one
`DW_TAG_subprogram` per source function.  Everything is DWARF version 4,
32-bit format, 8-byte addresses; the line program is one sequence from the
first row to the end of `.text`.
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


def debug_sections(rows: list[Row], funcs: list[Func], files: list[str], low: int, high: int,
                   comp_dir: str) -> dict[str, bytes]:
    """The .debug_abbrev, .debug_info and .debug_line contents for code in [low, high)."""
    return {".debug_abbrev": _abbrev(),
            ".debug_info": _info(files, funcs, low, high, comp_dir),
            ".debug_line": debug_line(rows, files, high)}

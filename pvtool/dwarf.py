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
came at a function's first instruction); the entry of a handler that
takes a TrapFrame is marked a signal frame (augmentation "zS"), so the
interrupted code is looked up at its exact address and the entry shows
as `<signal handler called>` between the handler and what it
interrupted; the boot code is outermost (its return address is
undefined, so a backtrace ends there).
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass, field
from operator import itemgetter

from .types import ArrayType, BoolType, FnType, IntType, PtrType, StructType, Type

VERSION = 4
LINE_BASE = -5
LINE_RANGE = 14
OPCODE_BASE = 13
STD_OPCODE_LENGTHS = bytes([0, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 1])

# standard and extended line opcodes
DW_LNS_copy, DW_LNS_advance_pc, DW_LNS_advance_line, DW_LNS_set_file, DW_LNS_set_column = 1, 2, 3, 4, 5
DW_LNS_set_prologue_end = 10
DW_LNE_end_sequence, DW_LNE_set_address = 1, 2

# tags, attributes, forms, encodings, location operations
DW_TAG_array_type, DW_TAG_formal_parameter, DW_TAG_member, DW_TAG_pointer_type = 0x01, 0x05, 0x0D, 0x0F
DW_TAG_compile_unit, DW_TAG_structure_type, DW_TAG_subroutine_type = 0x11, 0x13, 0x15
DW_TAG_subrange_type, DW_TAG_base_type, DW_TAG_subprogram, DW_TAG_variable = 0x21, 0x24, 0x2E, 0x34
DW_AT_location, DW_AT_name, DW_AT_byte_size, DW_AT_stmt_list, DW_AT_low_pc, DW_AT_high_pc = 0x02, 0x03, 0x0B, 0x10, 0x11, 0x12
DW_AT_language, DW_AT_comp_dir, DW_AT_producer, DW_AT_prototyped, DW_AT_upper_bound = 0x13, 0x1B, 0x25, 0x27, 0x2F
DW_AT_data_member_location, DW_AT_decl_file, DW_AT_decl_line, DW_AT_encoding = 0x38, 0x3A, 0x3B, 0x3E
DW_AT_external, DW_AT_type = 0x3F, 0x49
DW_FORM_addr, DW_FORM_data2, DW_FORM_string, DW_FORM_data1, DW_FORM_udata = 0x01, 0x05, 0x08, 0x0B, 0x0F
DW_FORM_ref4, DW_FORM_sec_offset, DW_FORM_exprloc, DW_FORM_flag_present = 0x13, 0x17, 0x18, 0x19
DW_ATE_boolean, DW_ATE_signed, DW_ATE_signed_char, DW_ATE_unsigned, DW_ATE_unsigned_char = 0x02, 0x05, 0x06, 0x07, 0x08
DW_OP_addr, DW_OP_reg0, DW_OP_breg0 = 0x03, 0x50, 0x70
DW_LANG_C99 = 0x0C
# DWARF numbers of the x86-64 registers (psABI), by the registers' x86 encoding 0-15
DWARF_REG = (0, 2, 1, 3, 7, 6, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15)
RSP, RBP, RA, RFLAGS, CS, SS = 7, 6, 16, 49, 51, 52

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

    `entered_by`: 'call', 'interrupt', 'trap entry' or 'outermost'; `steps`: (address, event, x86 register,
    distance) with the events of pvtool.obj (PUSHED_RBP ... RETURN_AT), in address order."""
    low: int
    high: int
    entered_by: str
    steps: list[tuple[int, str, int, int]]


@dataclass
class Variable:
    """A function's parameter or local: `places` are (low, high, register, rbp offset): from low
    to high it is in that x86 register, or at [rbp + offset] if register is None."""
    name: str
    type: Type
    param: bool
    places: list[tuple[int, int, int | None, int]]
    line: int = 0


@dataclass
class Func:
    name: str
    low: int
    high: int
    file: str
    line: int
    result: Type | None = None
    variables: list[Variable] = field(default_factory=list)


@dataclass
class Global:
    name: str
    type: Type
    address: int
    file: str
    line: int


def _uleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _sleb(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        done = (n == 0 and not byte & 0x40) or (n == -1 and byte & 0x40)
        out.append(byte | (0 if done else 0x80))
        if done:
            return bytes(out)


class _Encodings(dict):
    """LEB128 encodings by value, each made the first time it is asked for:
    the same few numbers (lines, columns, deltas, register numbers) are
    encoded thousands of times, and a lookup costs no Python call."""

    def __init__(self, encode) -> None:
        super().__init__()
        self.encode = encode

    def __missing__(self, n: int) -> bytes:
        b = self[n] = self.encode(n)
        return b


uleb = _Encodings(_uleb).__getitem__
sleb = _Encodings(_sleb).__getitem__


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


# -- .debug_info: the compile unit, its types, functions and variables ------------------------

@dataclass(eq=False)
class _Die:
    tag: int
    attrs: list[tuple[int, int, object]]        # (attribute, form, value); a ref4's value is a _Die
    children: list[_Die] | None = None          # None: the entry has no children


def _type_die(t: Type, dies: dict[Type, _Die], out: list[_Die]) -> _Die:
    """The entry describing PVK type `t` (made once per type, appended to `out`)."""
    if t in dies:
        return dies[t]
    if isinstance(t, IntType):
        encoding = {(8, False): DW_ATE_unsigned_char, (8, True): DW_ATE_signed_char}.get(
            (t.bits, t.signed), DW_ATE_signed if t.signed else DW_ATE_unsigned)
        die = _Die(DW_TAG_base_type, [(DW_AT_name, DW_FORM_string, t.name), (DW_AT_encoding, DW_FORM_data1, encoding),
                                      (DW_AT_byte_size, DW_FORM_data1, t.bits // 8)])
    elif isinstance(t, BoolType):
        die = _Die(DW_TAG_base_type, [(DW_AT_name, DW_FORM_string, "bool"),
                                      (DW_AT_encoding, DW_FORM_data1, DW_ATE_boolean), (DW_AT_byte_size, DW_FORM_data1, 1)])
    elif isinstance(t, (PtrType, FnType)):
        die = _Die(DW_TAG_pointer_type, [(DW_AT_byte_size, DW_FORM_data1, 8)])
    elif isinstance(t, ArrayType):
        die = _Die(DW_TAG_array_type, [], [_Die(DW_TAG_subrange_type, [(DW_AT_upper_bound, DW_FORM_udata, t.count - 1)])])
    elif isinstance(t, StructType):
        die = _Die(DW_TAG_structure_type, [(DW_AT_name, DW_FORM_string, t.name),
                                           (DW_AT_byte_size, DW_FORM_udata, t.info.size)], [])
    else:
        raise ValueError(f"no debugging description for type {t}")
    dies[t] = die                               # before the parts: a struct may point to itself
    out.append(die)
    if isinstance(t, PtrType):
        die.attrs.append((DW_AT_type, DW_FORM_ref4, _type_die(t.target, dies, out)))
    elif isinstance(t, FnType):
        params = [_Die(DW_TAG_formal_parameter, [(DW_AT_type, DW_FORM_ref4, _type_die(p, dies, out))])
                  for p in t.params]
        sub = _Die(DW_TAG_subroutine_type, [(DW_AT_prototyped, DW_FORM_flag_present, True)]
                   + _typed(t.result, dies, out), params)
        out.append(sub)
        die.attrs.append((DW_AT_type, DW_FORM_ref4, sub))
    elif isinstance(t, ArrayType):
        die.attrs.append((DW_AT_type, DW_FORM_ref4, _type_die(t.elem, dies, out)))
    elif isinstance(t, StructType):
        die.children += [_Die(DW_TAG_member, [(DW_AT_name, DW_FORM_string, f.name),
                                              (DW_AT_type, DW_FORM_ref4, _type_die(f.type, dies, out)),
                                              (DW_AT_data_member_location, DW_FORM_udata, f.offset)])
                         for f in t.info.fields or []]
    return die


def _typed(t: Type | None, dies: dict[Type, _Die], out: list[_Die]) -> list[tuple[int, int, object]]:
    return [] if t is None else [(DW_AT_type, DW_FORM_ref4, _type_die(t, dies, out))]


def _location(place: tuple[int, int, int | None, int]) -> bytes:
    _, _, reg, offset = place
    if reg is not None:
        return bytes([DW_OP_reg0 + DWARF_REG[reg]])
    return bytes([DW_OP_breg0 + RBP]) + sleb(offset)


def _loclist(places: list[tuple[int, int, int | None, int]], base: int, loc: bytearray) -> int:
    """Append a location list (addresses relative to the unit's base) to .debug_loc; its offset."""
    at = len(loc)
    for place in places:
        expr = _location(place)
        loc += struct.pack("<QQH", place[0] - base, place[1] - base, len(expr)) + expr
    loc += struct.pack("<QQ", 0, 0)
    return at


_FORMS = {DW_FORM_string: _cstr, DW_FORM_addr: lambda v: struct.pack("<Q", v), DW_FORM_data1: lambda v: bytes([v]),
          DW_FORM_data2: lambda v: struct.pack("<H", v), DW_FORM_udata: uleb,
          DW_FORM_sec_offset: lambda v: struct.pack("<I", v), DW_FORM_exprloc: lambda v: uleb(len(v)) + v,
          DW_FORM_flag_present: lambda v: b"", DW_FORM_ref4: lambda v: bytes(4)}

_ATTRIBUTE_FORM = itemgetter(0, 1)      # (attribute, form) of an (attribute, form, value)
_HEADER = 11                            # unit_length, version, abbrev_offset, address_size

# The (attribute, form) pairs of the entries written without a _Die, one
# entry per global, function and local variable; a type reference and a
# location are optional.
_TYPE = ((DW_AT_type, DW_FORM_ref4),)
_GLOBAL_NAME = ((DW_AT_name, DW_FORM_string),)
_GLOBAL_REST = ((DW_AT_external, DW_FORM_flag_present), (DW_AT_decl_file, DW_FORM_udata),
                (DW_AT_decl_line, DW_FORM_udata), (DW_AT_location, DW_FORM_exprloc))
_SUBPROGRAM = ((DW_AT_name, DW_FORM_string), (DW_AT_external, DW_FORM_flag_present),
               (DW_AT_prototyped, DW_FORM_flag_present), (DW_AT_decl_file, DW_FORM_udata),
               (DW_AT_decl_line, DW_FORM_udata), (DW_AT_low_pc, DW_FORM_addr), (DW_AT_high_pc, DW_FORM_addr))
_LOCAL = ((DW_AT_name, DW_FORM_string), (DW_AT_decl_line, DW_FORM_udata))
_LOCATED = ((DW_AT_location, DW_FORM_sec_offset),)


class _Info:
    """.debug_abbrev and .debug_info for one unit, written entry by entry in
    their final order, with an abbreviation per distinct shape of entry.  The
    types are few and may refer to each other (or to themselves), so they are
    _Die trees whose references are patched at the end; the many entries of
    globals, functions and locals are written straight from the records."""

    def __init__(self) -> None:
        self.abbrevs: dict[tuple, int] = {}
        self.table = bytearray()
        self.body = bytearray()
        self.offsets: dict[_Die, int] = {}
        self.refs: list[tuple[int, _Die]] = []

    def start(self, tag: int, children: bool, attributes: tuple) -> None:
        """Begin an entry of this shape: its abbreviation code."""
        shape = (tag, children, attributes)
        code = self.abbrevs.get(shape)
        if code is None:
            self.abbrevs[shape] = code = len(self.abbrevs) + 1
            self.table += (uleb(code) + uleb(tag) + bytes([children])
                           + b"".join(uleb(a) + uleb(f) for a, f in attributes) + b"\0\0")
        self.body += uleb(code)

    def entry(self, die: _Die) -> None:
        """One entry, without its children."""
        body = self.body
        self.offsets[die] = _HEADER + len(body)
        self.start(die.tag, die.children is not None, tuple(map(_ATTRIBUTE_FORM, die.attrs)))
        for _, form, value in die.attrs:
            if form == DW_FORM_ref4:                # patched once every entry has its offset
                self.refs.append((len(body), value))
            body += _FORMS[form](value)

    def tree(self, top: _Die) -> None:
        """An entry and its children, depth first."""
        # An explicit stack (None closes a list of children): a recursive
        # closure would be a reference cycle holding every entry.
        stack: list[_Die | None] = [top]
        while stack:
            die = stack.pop()
            if die is None:
                self.body.append(0)
                continue
            self.entry(die)
            if die.children is not None:
                stack.append(None)
                stack.extend(reversed(die.children))

    def type_ref(self, die: _Die | None) -> bytes:
        return b"" if die is None else struct.pack("<I", self.offsets[die])

    def sections(self) -> tuple[bytes, bytes]:
        self.body.append(0)                     # the end of the unit's children
        for at, target in self.refs:
            struct.pack_into("<I", self.body, at, self.offsets[target])
        after_length = struct.pack("<HIB", VERSION, 0, 8) + bytes(self.body)
        return bytes(self.table) + b"\0", struct.pack("<I", len(after_length)) + after_length


def _info(files: list[str], funcs: list[Func], variables: list[Global], low: int, high: int,
          comp_dir: str, loc: bytearray) -> tuple[bytes, bytes]:
    """(.debug_abbrev, .debug_info): the compile unit, then the types, the globals and the
    functions with their locals; .debug_loc gets the locals' location lists."""
    index = {f: k + 1 for k, f in enumerate(files)}
    dies: dict[Type, _Die] = {}
    types: list[_Die] = []
    # The types first, in the order the entries below meet them.
    for g in variables:
        _typed(g.type, dies, types)
    for f in funcs:
        for v in f.variables:
            _typed(v.type, dies, types)
        _typed(f.result, dies, types)
    info = _Info()
    info.entry(_Die(DW_TAG_compile_unit, [
        (DW_AT_producer, DW_FORM_string, PRODUCER), (DW_AT_language, DW_FORM_data2, DW_LANG_C99),
        (DW_AT_name, DW_FORM_string, files[0] if files else ""), (DW_AT_comp_dir, DW_FORM_string, comp_dir),
        (DW_AT_stmt_list, DW_FORM_sec_offset, 0), (DW_AT_low_pc, DW_FORM_addr, low),
        (DW_AT_high_pc, DW_FORM_addr, high)], []))
    for t in types:
        info.tree(t)
    body = info.body
    for g in variables:
        t = dies[g.type] if g.type is not None else None
        info.start(DW_TAG_variable, False, _GLOBAL_NAME + (_TYPE if t is not None else ()) + _GLOBAL_REST)
        address = bytes([DW_OP_addr]) + struct.pack("<Q", g.address)
        body += (_cstr(g.name) + info.type_ref(t) + uleb(index.get(g.file, 0)) + uleb(g.line)
                 + uleb(len(address)) + address)
    for f in funcs:
        t = dies[f.result] if f.result is not None else None
        info.start(DW_TAG_subprogram, True, _SUBPROGRAM + (_TYPE if t is not None else ()))
        body += (_cstr(f.name) + uleb(index.get(f.file, 0)) + uleb(f.line) + struct.pack("<QQ", f.low, f.high)
                 + info.type_ref(t))
        for v in f.variables:
            t = dies[v.type] if v.type is not None else None
            info.start(DW_TAG_formal_parameter if v.param else DW_TAG_variable, False,
                       _LOCAL + (_TYPE if t is not None else ()) + (_LOCATED if v.places else ()))
            body += _cstr(v.name) + uleb(v.line) + info.type_ref(t)
            if v.places:                        # else gdb says <optimized out>
                body += struct.pack("<I", _loclist(v.places, low, loc))
        body.append(0)
    return info.sections()


# -- call-frame information ---------------------------------------------------------------

DW_CFA_advance_loc, DW_CFA_offset, DW_CFA_restore = 0x40, 0x80, 0xC0
DW_CFA_advance_loc1, DW_CFA_advance_loc2, DW_CFA_advance_loc4 = 0x02, 0x03, 0x04
DW_CFA_undefined, DW_CFA_register, DW_CFA_remember_state, DW_CFA_restore_state = 0x07, 0x09, 0x0A, 0x0B
DW_CFA_def_cfa, DW_CFA_def_cfa_register, DW_CFA_def_cfa_offset = 0x0C, 0x0D, 0x0E
DATA_ALIGN = -8
# Where the caller's state is, relative to the CFA, on entry
ENTRY = {"call": (8, {RA: 8}),
         "interrupt": (40, {RA: 40, CS: 32, RFLAGS: 24, RSP: 16, SS: 8}),   # rip cs rflags rsp ss
         "trap entry": (40, {RA: 40, CS: 32, RFLAGS: 24, RSP: 16, SS: 8})}


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
    augmentation = b"zS\0" if entered_by == "trap entry" else b"\0"      # S: a signal frame, see above
    body = (struct.pack("<IB", 0xFFFFFFFF, VERSION) + augmentation + bytes([8, 0]) + uleb(1) + sleb(DATA_ALIGN)
            + uleb(RA) + (uleb(0) if entered_by == "trap entry" else b"")
            + bytes([DW_CFA_def_cfa]) + uleb(RSP) + uleb(cfa)
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
    for address, event, reg, value in frame.steps:
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
            case "caller unknown":
                out += bytes([DW_CFA_undefined]) + uleb(RA)
            case "cfa at":
                out += bytes([DW_CFA_def_cfa]) + uleb(DWARF_REG[reg]) + uleb(value)
            case "saved at":
                out += _saved(DWARF_REG[reg], value)
            case "return address at":
                out += _saved(RA, value)
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
        augmentation = uleb(0) if f.entered_by == "trap entry" else b""
        out += _padded(struct.pack("<IQQ", cie, f.low, f.high - f.low) + augmentation + _frame_program(f))
    return bytes(out)


def debug_sections(rows: list[Row], funcs: list[Func], files: list[str], low: int, high: int,
                   comp_dir: str, frames: list[Frame] | None = None,
                   variables: list[Global] | None = None) -> dict[str, bytes]:
    """The .debug_abbrev, .debug_info, .debug_line, .debug_loc and .debug_frame contents for
    code in [low, high)."""
    loc = bytearray()
    abbrev, info = _info(files, funcs, variables or [], low, high, comp_dir, loc)
    sections = {".debug_abbrev": abbrev, ".debug_info": info, ".debug_line": debug_line(rows, files, high)}
    if loc:
        sections[".debug_loc"] = bytes(loc)
    if frames:
        sections[".debug_frame"] = debug_frame(frames)
    return sections

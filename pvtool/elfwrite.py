"""The ELF64 writer: turns a `LinkedImage` into an ET_EXEC file for x86-64.

File layout:

    ELF header, program headers           offset 0 (not loaded)
    allocated sections                    offset 0x1000 + (addr - LOAD_BASE)
    .pv.sites, .debug_*, .symtab, .strtab, .shstrtab
    section header table

Allocated contents sit at a fixed distance from their address, so every
PT_LOAD has p_offset = p_vaddr (mod 0x1000).  One PT_LOAD per permission
group (R-X text, R rodata + notes, RW data + bss), one for each user section
(R-X .user.text, RW .user.data), and one PT_NOTE.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from pvimage import abi

from . import dwarf
from .linked import LinkedImage, Section

# ELF constants (System V gABI, x86-64 psABI)
ET_EXEC, EM_X86_64, EV_CURRENT = 2, 62, 1
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
SHT_PROGBITS, SHT_SYMTAB, SHT_STRTAB, SHT_NOTE, SHT_NOBITS = 1, 2, 3, 7, 8
SHF_WRITE, SHF_ALLOC, SHF_EXECINSTR = 1, 2, 4
STB_LOCAL, STB_GLOBAL = 0, 1
STT_NOTYPE, STT_OBJECT, STT_FUNC, STT_FILE = 0, 1, 2, 4
SHN_ABS = 0xFFF1

EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
SHDR = struct.Struct("<IIQQQQIIQQ")
SYM = struct.Struct("<IBBHQQ")

HEADER_ROOM = 0x1000       # file offset of LOAD_BASE
SEGMENT_ALIGN = 0x1000
PERMS = {"rx": PF_R | PF_X, "r": PF_R, "rw": PF_R | PF_W}
SH_FLAGS = {"rx": SHF_ALLOC | SHF_EXECINSTR, "r": SHF_ALLOC, "rw": SHF_ALLOC | SHF_WRITE}
SH_TYPES = {"progbits": SHT_PROGBITS, "nobits": SHT_NOBITS, "note": SHT_NOTE}
SYM_TYPES = {"func": STT_FUNC, "object": STT_OBJECT, "notype": STT_NOTYPE}


@dataclass
class _Shdr:
    name: str
    type: int
    flags: int
    addr: int
    offset: int
    size: int
    link: int = 0
    info: int = 0
    align: int = 1
    entsize: int = 0


class _Strtab:
    def __init__(self) -> None:
        self.blob = bytearray(b"\0")
        self.index: dict[str, int] = {"": 0}

    def add(self, s: str) -> int:
        if s not in self.index:
            self.index[s] = len(self.blob)
            self.blob += s.encode() + b"\0"
        return self.index[s]


def file_offset(addr: int) -> int:
    return addr - abi.LOAD_BASE + HEADER_ROOM


def _segments(image: LinkedImage) -> list[bytes]:
    groups: dict[str, list[Section]] = {}
    for s in image.sections:
        groups.setdefault(s.segment or s.perm, []).append(s)
    phdrs = []
    for group in groups.values():
        perm = group[0].perm
        start = min(s.addr for s in group)
        file_end = max([start] + [s.addr + s.size for s in group if s.kind != "nobits"])
        mem_end = max(s.addr + s.size for s in group)
        phdrs.append(PHDR.pack(PT_LOAD, PERMS[perm], file_offset(start), start, start,
                               file_end - start, mem_end - start, SEGMENT_ALIGN))
    notes = [s for s in image.sections if s.kind == "note"]
    if notes:
        start, end = notes[0].addr, notes[-1].addr + notes[-1].size
        phdrs.append(PHDR.pack(PT_NOTE, PF_R, file_offset(start), start, start, end - start, end - start, 4))
    return phdrs


def _symtab(image: LinkedImage, index: dict[str, int], strtab: _Strtab) -> tuple[bytes, int]:
    """.symtab contents and the index of the first global symbol."""
    entries = [SYM.pack(0, 0, 0, 0, 0, 0)]
    for f in image.files:
        entries.append(SYM.pack(strtab.add(f), STB_LOCAL << 4 | STT_FILE, 0, SHN_ABS, 0, 0))
    first_global = len(entries)
    for s in image.symbols:
        entries.append(SYM.pack(strtab.add(s.name), STB_GLOBAL << 4 | SYM_TYPES[s.kind], 0,
                                index[s.section], s.addr, s.size))
    return b"".join(entries), first_global


def _debug(image: LinkedImage) -> dict[str, bytes]:
    code = [s for s in image.sections if s.perm == "rx"]
    return dwarf.debug_sections(image.lines, image.funcs, image.files,
                                code[0].addr, code[-1].addr + code[-1].size, os.getcwd(), image.frames,
                                image.variables)


def write(image: LinkedImage) -> bytes:
    """The ELF64 executable for `image`."""
    alloc: list[Section] = image.sections
    extra = {abi.SITES_SECTION: abi.pack_sites(image.sites), **_debug(image)}
    strtab, shstrtab = _Strtab(), _Strtab()
    index = {s.name: k + 1 for k, s in enumerate(alloc)}

    alloc_end = max(file_offset(s.addr + s.size) for s in alloc if s.kind != "nobits")
    body = bytearray(alloc_end)
    shdrs = [_Shdr("", 0, 0, 0, 0, 0)]
    for s in alloc:
        off = min(file_offset(s.addr), alloc_end)
        if s.kind != "nobits":
            body[off:off + len(s.data)] = s.data
        shdrs.append(_Shdr(s.name, SH_TYPES[s.kind], SH_FLAGS[s.perm], s.addr, off, s.size, align=s.align))

    def append(name: str, sh_type: int, blob: bytes, align: int = 1, **kw) -> None:
        body.extend(b"\0" * (-len(body) % align))
        shdrs.append(_Shdr(name, sh_type, 0, 0, len(body), len(blob), align=align, **kw))
        body.extend(blob)

    for name, blob in extra.items():
        append(name, SHT_PROGBITS, blob, 8 if name == abi.SITES_SECTION else 1)
    symtab, first_global = _symtab(image, index, strtab)
    symtab_index = len(shdrs)
    append(".symtab", SHT_SYMTAB, symtab, 8, link=symtab_index + 1, info=first_global, entsize=SYM.size)
    append(".strtab", SHT_STRTAB, bytes(strtab.blob))
    for sh in shdrs:
        shstrtab.add(sh.name)
    shstrtab.add(".shstrtab")
    append(".shstrtab", SHT_STRTAB, bytes(shstrtab.blob))

    body.extend(b"\0" * (-len(body) % 8))
    shoff = len(body)
    for sh in shdrs:
        body += SHDR.pack(shstrtab.add(sh.name), sh.type, sh.flags, sh.addr, sh.offset, sh.size,
                          sh.link, sh.info, sh.align, sh.entsize)

    phdrs = _segments(image)
    ident = b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)    # 64-bit, little-endian, SysV
    header = EHDR.pack(ident, ET_EXEC, EM_X86_64, EV_CURRENT, image.entry, EHDR.size, shoff, 0,
                       EHDR.size, PHDR.size, len(phdrs), SHDR.size, len(shdrs), len(shdrs) - 1)
    head = header + b"".join(phdrs)
    assert len(head) <= HEADER_ROOM
    body[:len(head)] = head
    return bytes(body)

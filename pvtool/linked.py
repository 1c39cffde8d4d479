"""A linked guest: the linker's output and the ELF writer's input.

Everything sits at its final address: allocated sections with their bytes,
symbols, source-line rows, sensitive sites and ELF notes.  No file format
yet; `pvtool.elfwrite` turns it into an ELF64 file.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from pvimage import abi

from . import dwarf


@dataclass
class Section:
    name: str
    addr: int
    data: bytes          # file contents; empty for nobits
    size: int            # bytes in memory
    kind: str            # 'progbits', 'nobits' or 'note'
    perm: str            # 'rx', 'r' or 'rw'
    align: int
    segment: str = ""    # neighbours with the same segment (default: their perm) share a PT_LOAD


@dataclass
class Symbol:
    name: str
    addr: int
    size: int
    kind: str            # 'func', 'object' or 'notype'
    section: str


@dataclass
class Note:
    owner: str
    type: int
    desc: bytes


@dataclass
class LinkedImage:
    """A linked guest: everything at its final address, ready for `pvtool.elf.write`."""
    name: str
    target: str
    entry: int                       # _start, 64-bit
    entry32: int | None              # _start32, the PVH entry (native only)
    hypercall_page: int | None       # pv only
    sections: list[Section]          # allocated sections in address order
    symbols: list[Symbol]
    files: list[str]
    lines: list[dwarf.Row] = field(default_factory=list)
    frames: list[dwarf.Frame] = field(default_factory=list)  # for .debug_frame
    funcs: list[dwarf.Func] = field(default_factory=list)   # source functions, for .debug_info
    variables: list[dwarf.Global] = field(default_factory=list)   # source globals, for .debug_info
    sites: list[abi.Site] = field(default_factory=list)
    notes: list[Note] = field(default_factory=list)

    def section(self, name: str) -> Section:
        return next(s for s in self.sections if s.name == name)

    def symbol(self, name: str) -> Symbol:
        return next(s for s in self.symbols if s.name == name)

    @property
    def end(self) -> int:
        return max(s.addr + s.size for s in self.sections)

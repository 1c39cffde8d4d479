"""A symbolizer for ELF64 x86-64 images: the one place that reads them back.

`load(data)` checks the headers itself (so bad input gets a one-line reason,
never a pyelftools traceback), then collects what `pvtool check`, `pvtool
diff` and the runtime's fault reports need: executable segments, functions
from the symbol table, a sorted address -> source line table from
`.debug_line`, the PVTool notes and the `.pv.sites` table.  Works on our
images and on anything gcc makes.
"""
from __future__ import annotations

import io
import struct
from bisect import bisect_right
from dataclasses import dataclass, field
from pathlib import Path

from elftools.dwarf.structs import DWARFStructs
from elftools.elf.elffile import ELFFile

from . import abi

EM_X86_64 = 62
ET_EXEC, ET_DYN = 2, 3
PT_LOAD, PT_NOTE = 1, 4
PF_X, PF_W, PF_R = 1, 2, 4
PN_XNUM = 0xFFFF
SHN_XINDEX = 0xFFFF
SHT_NOBITS = 8
SHF_EXECINSTR = 4
ADDRESS_LIMIT = 1 << 64
_PHDR = struct.Struct("<IIQQQQQQ")   # type, flags, offset, vaddr, paddr, filesz, memsz, align
_KNOWN_FEATURES = abi.FEATURE_MULTICALL | abi.FEATURE_EVENTS

_MACHINES = {3: "i386", 8: "MIPS", 20: "PowerPC", 21: "PowerPC64", 40: "ARM",
             43: "SPARC V9", 183: "AArch64", 243: "RISC-V"}


class ImageError(Exception):
    """The file is not a readable ELF64 x86-64 image; str() is a one-line reason."""


@dataclass(frozen=True)
class Function:
    name: str
    address: int
    size: int

    @property
    def end(self) -> int:
        return self.address + self.size


@dataclass(frozen=True)
class Segment:
    """A PT_LOAD segment: its file bytes at its virtual (= physical) address, zero-filled to `memsz`."""
    index: int            # in the program header table
    address: int
    memsz: int
    data: bytes           # the file bytes, at most memsz of them
    flags: int            # PF_R | PF_W | PF_X

    @property
    def end(self) -> int:
        return self.address + self.memsz

    @property
    def executable(self) -> bool:
        return bool(self.flags & PF_X)

    @property
    def writable(self) -> bool:
        return bool(self.flags & PF_W)

    @property
    def page_end(self) -> int:
        return _page_up(self.end)

    @property
    def code(self) -> bytes:
        """What a loader maps executable for this segment: its bytes, zero-filled to the end of its last page."""
        return self.data.ljust(self.page_end - self.address, b"\0")


@dataclass
class ElfInfo:
    """What an image holds, symbolized; build one with `load` or `load_file`."""
    entry: int
    segments: list[Segment]
    functions: list[Function]                     # sorted by address, non-overlapping starts
    lines: list[tuple[int, str | None, int]]      # (address, file, line), sorted; file None ends a sequence
    notes: dict[int, bytes] = field(default_factory=dict)   # PVTool notes by type
    sites: list[abi.Site] = field(default_factory=list)
    pvh_entry: int | None = None    # Xen PHYS32_ENTRY: 32-bit code starts here

    def __post_init__(self) -> None:
        self._starts = [f.address for f in self.functions]
        self._line_addrs = [row[0] for row in self.lines]

    # -- notes --------------------------------------------------------------
    @property
    def has_pv_notes(self) -> bool:
        return bool(self.notes)

    @property
    def mode(self) -> str:
        """'pv' or 'native'; an image without a PVTool note counts as native (docs/abi.md)."""
        desc = self.notes.get(abi.NOTE_MODE)
        return "pv" if desc and _u(desc, 4) == abi.MODE_PV else "native"

    @property
    def hypercall_page(self) -> int | None:
        desc = self.notes.get(abi.NOTE_HYPERCALL_PAGE)
        return _u(desc, 8) if desc and len(desc) >= 8 else None

    @property
    def guest_name(self) -> str | None:
        desc = self.notes.get(abi.NOTE_GUEST_NAME)
        return desc.split(b"\0", 1)[0].decode(errors="replace") if desc is not None else None

    @property
    def orphan_hypercall_page(self) -> int | None:
        """The address of a `hypercall_page` symbol in an image without PVTool notes: a PV guest
        that lost its notes (it would run as a native image and die in the unfilled page)."""
        if self.has_pv_notes:
            return None
        fn = self.function("hypercall_page") or self.function("__hypercall_page")
        return fn.address if fn else None

    @property
    def features(self) -> int:
        desc = self.notes.get(abi.NOTE_FEATURES)
        return _u(desc, 4) if desc else 0

    # -- code -----------------------------------------------------------------
    @property
    def executable(self) -> list[Segment]:
        return [s for s in self.segments if s.executable]

    def read(self, address: int, size: int) -> bytes:
        """File bytes at [address, address+size) within one segment; b'' if unmapped."""
        for s in self.segments:
            if s.address <= address < s.end:
                off = address - s.address
                return s.data[off:off + size]
        return b""

    @property
    def code32(self) -> tuple[int, int] | None:
        """[start, end) of the function holding the PVH entry: 32-bit code (QEMU enters it in protected mode)."""
        hit = self.function_at(self.pvh_entry) if self.pvh_entry is not None else None
        return (hit[0].address, hit[0].end) if hit else None

    def bits_at(self, address: int) -> int:
        r = self.code32
        return 32 if r and r[0] <= address < r[1] else 64

    def function(self, name: str) -> Function | None:
        return next((f for f in self.functions if f.name == name), None)

    # -- symbolization -------------------------------------------------------------
    def function_at(self, address: int) -> tuple[Function, int] | None:
        """The function containing `address` and the offset into it."""
        k = bisect_right(self._starts, address) - 1
        if k >= 0 and address < self.functions[k].end:
            fn = self.functions[k]
            return fn, address - fn.address
        return None

    def line_at(self, address: int) -> tuple[str, int] | None:
        """(file, line) of the code at `address`, from .debug_line."""
        k = bisect_right(self._line_addrs, address) - 1
        if k < 0 or self.lines[k][1] is None:
            return None
        _, file, line = self.lines[k]
        return file, line

    def describe(self, address: int) -> str:
        """`0x100123 kmain+0x13 (hello.pvk:7)`, for fault reports."""
        out = f"{address:#x}"
        hit = self.function_at(address)
        if hit:
            out += f" {hit[0].name}+{hit[1]:#x}"
        src = self.line_at(address)
        if src:
            out += f" ({src[0]}:{src[1]})"
        return out


def _u(desc: bytes, size: int) -> int:
    return int.from_bytes(desc[:size], "little")


# -- loading ----------------------------------------------------------------------

def load_file(path: str | Path) -> ElfInfo:
    """`load` on a file's bytes; an unreadable file is an ImageError too."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ImageError(f"{path}: {e.strerror or e}") from None
    return load(data)


def load(data: bytes) -> ElfInfo:
    """Parse an ELF64 x86-64 image; raises ImageError with a one-line reason."""
    _check_header(data)
    headers = _program_headers(data)
    segments = _segments(data, headers)
    _check_sections(data)
    notes = _note_blobs(data, headers)
    try:
        elf = ELFFile(io.BytesIO(data))
        if not notes:
            notes = [(s.header.sh_offset, s.header.sh_size, s.header.sh_addralign)
                     for s in elf.iter_sections() if s.header.sh_type == "SHT_NOTE"]
        pvtool = _notes(data, notes, abi.NOTE_OWNER)
        pvh = _notes(data, notes, abi.XEN_NOTE_OWNER).get(abi.XEN_ELFNOTE_PHYS32_ENTRY)
        info = ElfInfo(entry=struct.unpack_from("<Q", data, 24)[0], segments=segments,
                       functions=_functions(elf, segments), lines=_line_table(elf),
                       notes=pvtool, sites=_sites(elf),
                       pvh_entry=_u(pvh, 4) if pvh and len(pvh) >= 4 else None)
    except ImageError:
        raise
    except Exception as e:  # pyelftools raises many kinds on malformed input
        raise ImageError(f"malformed ELF: {_one_line(e)}") from None
    _check_notes(info.notes)
    return info


def _one_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _page_up(address: int) -> int:
    return -(-address // abi.PAGE_SIZE) * abi.PAGE_SIZE


def _check_header(data: bytes) -> None:
    """The ELF header: the checks pyelftools would fail on with a traceback, done up front."""
    if len(data) < 4 or data[:4] != b"\x7fELF":
        raise ImageError("not an ELF file" if data else "empty file")
    if len(data) < 64:
        raise ImageError("truncated ELF header")
    if data[4] != 2:
        raise ImageError("32-bit ELF (ELFCLASS32); expected ELF64" if data[4] == 1 else "bad ELF class")
    if data[5] != 1:
        raise ImageError("big-endian ELF; expected little-endian x86-64")
    e_type, machine = struct.unpack_from("<HH", data, 16)
    if machine != EM_X86_64:
        raise ImageError(f"ELF for {_MACHINES.get(machine, f'machine {machine}')}; expected x86-64")
    if e_type not in (ET_EXEC, ET_DYN):
        raise ImageError("not an executable image (ELF type is not EXEC or DYN)")


@dataclass(frozen=True)
class _Phdr:
    index: int
    type: int
    flags: int
    offset: int
    vaddr: int
    paddr: int
    filesz: int
    memsz: int
    align: int


def _program_headers(data: bytes) -> list[_Phdr]:
    """The program header table exactly as e_phoff/e_phnum/e_phentsize describe it.

    Extended numbering (e_phnum = PN_XNUM, the count in section 0) is refused:
    readers disagree on it, and a loader and a validator that count
    differently would map code that was never checked."""
    phoff, = struct.unpack_from("<Q", data, 32)
    phentsize, phnum = struct.unpack_from("<HH", data, 54)
    if phnum == PN_XNUM:
        raise ImageError("extended program header numbering (e_phnum = PN_XNUM) is not supported")
    if phnum == 0:
        raise ImageError("no program headers")
    if phentsize != _PHDR.size:
        raise ImageError(f"bad e_phentsize {phentsize} (ELF64 program headers are {_PHDR.size} bytes)")
    if phoff + phnum * _PHDR.size > len(data):
        raise ImageError("truncated or bad program header table")
    out = []
    for k in range(phnum):
        h = _Phdr(k, *_PHDR.unpack_from(data, phoff + k * _PHDR.size))
        if h.type in (PT_LOAD, PT_NOTE) and h.offset + h.filesz > len(data):
            raise ImageError(f"truncated: segment {k} extends past the end of the file")
        out.append(h)
    return out


def _segments(data: bytes, headers: list[_Phdr]) -> list[Segment]:
    """The PT_LOAD segments, refusing any layout a loader could read two ways."""
    out = []
    for h in headers:
        if h.type != PT_LOAD or h.memsz == 0:
            continue
        k = h.index
        if h.filesz > h.memsz:
            raise ImageError(f"segment {k}: file size {h.filesz:#x} exceeds memory size {h.memsz:#x}")
        if h.vaddr != h.paddr:
            raise ImageError(f"segment {k}: virtual address {h.vaddr:#x} differs from physical {h.paddr:#x} "
                             f"(images are identity-placed)")
        if h.vaddr + h.memsz > ADDRESS_LIMIT:
            raise ImageError(f"segment {k} ({h.vaddr:#x}+{h.memsz:#x}) runs past the end of the address space")
        if h.flags & PF_X and h.vaddr % abi.PAGE_SIZE:
            raise ImageError(f"executable segment {k} at {h.vaddr:#x} is not page-aligned (code rule R1)")
        if h.flags & PF_X and h.vaddr + h.memsz > _page_up(h.vaddr + h.filesz):
            # zero-fill past the file's last page would be code no file holds: unbounded work to check
            raise ImageError(f"executable segment {k}: memory size {h.memsz:#x} reaches past the last page of "
                             f"its {h.filesz:#x} file bytes (code rule R1)")
        out.append(Segment(k, h.vaddr, h.memsz, data[h.offset:h.offset + h.filesz], h.flags))
    if not any(s.executable for s in out):
        raise ImageError("no executable segment")
    out.sort(key=lambda s: s.address)
    for a, b in zip(out, out[1:]):
        if b.address < a.end:
            raise ImageError(f"segments {a.index} and {b.index} overlap "
                             f"({a.address:#x}-{a.end:#x} and {b.address:#x}-{b.end:#x})")
        # Pages are mapped whole: a neighbour in an executable segment's last
        # page would be executable too, and never validated.
        if a.executable and b.address < a.page_end:
            raise ImageError(f"segment {b.index} at {b.address:#x} shares a page with executable segment "
                             f"{a.index} (code rule R1: executable segments end on a page of their own)")
    return out


def _check_sections(data: bytes) -> None:
    shoff, = struct.unpack_from("<Q", data, 40)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 58)
    if (shoff and shnum == 0) or shstrndx == SHN_XINDEX:
        raise ImageError("extended section numbering (section count or name index in section 0) is not supported")
    if not shnum:
        return
    if shentsize != 64 or shoff + shnum * 64 > len(data):
        raise ImageError("truncated or bad section header table")
    for k in range(1, shnum):
        sh_type, = struct.unpack_from("<I", data, shoff + 64 * k + 4)
        off, size = struct.unpack_from("<QQ", data, shoff + 64 * k + 24)
        if sh_type != SHT_NOBITS and off + size > len(data):
            raise ImageError(f"truncated: section {k} extends past the end of the file")


def _note_blobs(data: bytes, headers: list[_Phdr]) -> list[tuple[int, int, int]]:
    """(offset, size, alignment) of each PT_NOTE segment: the notes a loader sees."""
    return [(h.offset, h.filesz, h.align) for h in headers if h.type == PT_NOTE]


def _notes(data: bytes, blobs: list[tuple[int, int, int]], owner: str) -> dict[int, bytes]:
    """`owner`'s notes, first of each type, from the note blobs (offset, size, alignment)."""
    notes: dict[int, bytes] = {}
    for off, size, align in blobs:
        for name, ntype, desc in _parse_notes(data[off:off + size], 8 if align == 8 else 4):
            if name == owner:
                notes.setdefault(ntype, desc)
    return notes


def _check_notes(notes: dict[int, bytes]) -> None:
    """Refuse malformed PVTool notes, and an ABI version this toolchain does not speak."""
    version = _u32_note(notes, abi.NOTE_ABI_VERSION, "ABI-version")
    if version is not None and version != abi.ABI_VERSION:
        raise ImageError(f"PV ABI version {version} is not supported (this toolchain speaks version "
                         f"{abi.ABI_VERSION}: rebuild the image)")
    mode = _u32_note(notes, abi.NOTE_MODE, "mode")
    if mode not in (None, abi.MODE_NATIVE, abi.MODE_PV):
        raise ImageError(f"PVTool mode note has unknown mode {mode}")
    features = _u32_note(notes, abi.NOTE_FEATURES, "features")
    if features is not None and features & ~_KNOWN_FEATURES:
        raise ImageError(f"PVTool features note has unknown bits {features & ~_KNOWN_FEATURES:#x}")
    page = notes.get(abi.NOTE_HYPERCALL_PAGE)
    if page is not None and len(page) != 8:
        raise ImageError(f"malformed PVTool hypercall-page note: {len(page)}-byte descriptor, expected 8")
    name = notes.get(abi.NOTE_GUEST_NAME)
    if name is not None and b"\0" not in name:
        raise ImageError("PVTool guest-name note is not NUL-terminated")


def _u32_note(notes: dict[int, bytes], ntype: int, what: str) -> int | None:
    desc = notes.get(ntype)
    if desc is None:
        return None
    if len(desc) != 4:
        raise ImageError(f"malformed PVTool {what} note: {len(desc)}-byte descriptor, expected 4")
    return int.from_bytes(desc, "little")


def _parse_notes(blob: bytes, align: int):
    """(owner, type, desc) of each note; stops at a truncated one (other owners' notes are not ours to judge)."""
    pad = lambda n: (n + align - 1) & -align
    off = 0
    while off + 12 <= len(blob):
        namesz, descsz, ntype = struct.unpack_from("<III", blob, off)
        name_at = off + 12
        desc_at = pad(name_at + namesz)
        if desc_at + descsz > len(blob):
            return
        name = blob[name_at:name_at + namesz].rstrip(b"\0").decode(errors="replace")
        yield name, ntype, blob[desc_at:desc_at + descsz]
        off = pad(desc_at + descsz)


def _functions(elf: ELFFile, segments: list[Segment]) -> list[Function]:
    """STT_FUNC symbols; labels (STT_NOTYPE in code) only where no function covers them."""
    symtab = elf.get_section_by_name(".symtab") or elf.get_section_by_name(".dynsym")
    if symtab is None or not hasattr(symtab, "iter_symbols"):
        return []
    exec_sections = {k for k, s in enumerate(elf.iter_sections()) if s.header.sh_flags & SHF_EXECINSTR}
    funcs: dict[int, Function] = {}
    labels: dict[int, str] = {}
    for sym in symtab.iter_symbols():
        kind, shndx, addr = sym.entry.st_info.type, sym.entry.st_shndx, sym.entry.st_value
        if not sym.name or shndx in ("SHN_UNDEF", "SHN_ABS") or not isinstance(shndx, int):
            continue
        if kind == "STT_FUNC":
            old = funcs.get(addr)
            if old is None or (old.size == 0 and sym.entry.st_size):
                funcs[addr] = Function(sym.name, addr, sym.entry.st_size)
        elif kind == "STT_NOTYPE" and shndx in exec_sections and not sym.name.startswith((".", "$")):
            labels.setdefault(addr, sym.name)
    covered = [(f.address, f.end) for f in funcs.values() if f.size]
    for addr, name in labels.items():
        if addr not in funcs and not any(a <= addr < e for a, e in covered):
            funcs[addr] = Function(name, addr, 0)
    return _fill_sizes(sorted(funcs.values(), key=lambda f: f.address), segments)


def _fill_sizes(funcs: list[Function], segments: list[Segment]) -> list[Function]:
    """A symbol without a size runs to the next symbol or the end of its segment."""
    out = []
    for k, f in enumerate(funcs):
        if f.size == 0:
            seg_end = next((s.end for s in segments if s.address <= f.address < s.end), f.address)
            nxt = funcs[k + 1].address if k + 1 < len(funcs) else seg_end
            f = Function(f.name, f.address, max(0, min(nxt, seg_end) - f.address))
        out.append(f)
    return out


# -- .debug_line ------------------------------------------------------------------------

def _line_table(elf: ELFFile) -> list[tuple[int, str | None, int]]:
    if elf.get_section_by_name(".debug_line") is None:
        return []
    dwarf = elf.get_dwarf_info(relocate_dwarf_sections=False)
    if dwarf.debug_info_sec is not None and dwarf.debug_info_sec.size:
        programs = [dwarf.line_program_for_CU(cu) for cu in dwarf.iter_CUs()]
    else:
        programs = list(_bare_line_programs(dwarf))
    rows: list[tuple[int, str | None, int]] = []
    for prog in programs:
        if prog is not None:
            rows.extend(_rows(prog))
    # End-of-sequence markers sort after a row at the same address, so a
    # sequence starting where another ends keeps its line.
    rows.sort(key=lambda r: (r[0], r[1] is not None))
    return rows


def _bare_line_programs(dwarf):
    """Line programs of a .debug_line with no .debug_info to point at them (walk the units)."""
    sec = dwarf.debug_line_sec
    stream = sec.stream
    off = 0
    while off + 6 <= sec.size:
        stream.seek(off)
        length, version = struct.unpack("<IH", stream.read(6))
        if length == 0xFFFFFFFF:
            raise ImageError("64-bit DWARF in .debug_line is not supported")
        structs = DWARFStructs(little_endian=True, dwarf_format=32, address_size=8, dwarf_version=version)
        # pyelftools exposes no public walk over .debug_line units.
        yield dwarf._parse_line_program_at_offset(off, structs)
        off += 4 + length


def _rows(prog) -> list[tuple[int, str | None, int]]:
    header = prog.header
    version = header["version"]
    files = header["file_entry"]
    dirs = header["include_directory"]

    def file_name(index: int) -> str:
        k = index if version >= 5 else index - 1
        if not 0 <= k < len(files):
            return "?"
        entry = files[k]
        name = _text(entry.name)
        d = entry.dir_index
        # Directory 0 is the compilation directory: keep names short there.
        if d and d - (0 if version >= 5 else 1) < len(dirs) and not name.startswith("/"):
            return _text(dirs[d - (0 if version >= 5 else 1)]) + "/" + name
        return name

    rows = []
    for entry in prog.get_entries():
        st = entry.state
        if st is None:
            continue
        if st.end_sequence:
            rows.append((st.address, None, 0))
        else:
            rows.append((st.address, file_name(st.file), st.line))
    return rows


def _text(s) -> str:
    return s.decode(errors="replace") if isinstance(s, bytes) else str(s)


# -- .pv.sites -----------------------------------------------------------------------------

def _sites(elf: ELFFile) -> list[abi.Site]:
    sec = elf.get_section_by_name(abi.SITES_SECTION)
    if sec is None:
        return []
    try:
        return abi.unpack_sites(sec.data())
    except ValueError as e:
        raise ImageError(f"{abi.SITES_SECTION}: {e}") from None

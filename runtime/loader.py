"""The loader: an ELF64 x86-64 ET_EXEC image, checked before anything runs.

`load_image` reads the image with `pvimage.elfread` (which turns junk and
truncation into a one-line `ImageError`), then refuses anything the
hypervisor cannot run safely:

- every PT_LOAD segment lies inside guest RAM, at or above 1 MiB (below is
  the hypervisor's), is identity-placed (virtual == physical: the boot map
  is an identity map), and overlaps no other segment;
- the entry point lies inside an executable segment;
- the PVTool notes are well formed; a PV image declares a page-aligned
  hypercall page inside a text segment;
- a PV image contains no sensitive instruction: the same capstone sweep as
  `pvtool check` (`pvimage.sweep`), which skips the hypercall page.

The sweep's findings are kept: trap mode hooks exactly those addresses.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvimage import abi
from pvimage.elfread import ElfInfo, load
from pvimage.sweep import Finding, sweep_image

from .errors import ImageError
from .memory import PAGE, R, W, X

ET_EXEC = 2
PT_LOAD = 1
PF_X, PF_W = 1, 2
MAX_SEGMENTS = 64
_PHDR = struct.Struct("<IIQQQQQQ")
_FEATURES = abi.FEATURE_MULTICALL | abi.FEATURE_EVENTS


@dataclass(frozen=True)
class LoadSegment:
    index: int
    address: int          # guest-physical, equal to the virtual address
    memsz: int
    data: bytes           # the file bytes; the rest up to memsz is zero
    perm: int             # memory.R | W | X from the ELF flags

    @property
    def end(self) -> int:
        return self.address + self.memsz


@dataclass
class Image:
    entry: int
    mode: str                             # 'pv' or 'native', from the notes
    segments: list[LoadSegment]
    info: ElfInfo                         # symbols and lines for fault reports
    hypercall_page: int | None = None
    sensitive: list[Finding] = field(default_factory=list)

    def describe(self, address: int) -> str:
        """`0x100123 kmain+0x13 (hello.pvk:7)`."""
        return self.info.describe(address)


def load_image(data: bytes, ram_size: int) -> Image:
    """Parse and validate an image for a guest with `ram_size` bytes of RAM; ImageError if refused."""
    info = load(data)
    if struct.unpack_from("<H", data, 16)[0] != ET_EXEC:
        raise ImageError("not an ET_EXEC image (position-independent images cannot be loaded)")
    segments = _segments(data, ram_size)
    _check_entry(info.entry, segments)
    mode = _check_notes(info)
    image = Image(info.entry, mode, segments, info)
    image.sensitive = sweep_image(info)
    if mode == "pv":
        image.hypercall_page = _check_hypercall_page(info.hypercall_page, segments)
        if image.sensitive:
            f = image.sensitive[0]
            n = len(image.sensitive)
            raise ImageError(f"PV image contains {n} sensitive instruction{'s' if n > 1 else ''}; "
                             f"first: {f.asm} at {image.describe(f.address)}")
    return image


def _segments(data: bytes, ram_size: int) -> list[LoadSegment]:
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    out = []
    for k in range(phnum):
        p_type, flags, offset, vaddr, paddr, filesz, memsz, _ = _PHDR.unpack_from(data, phoff + k * _PHDR.size)
        if p_type != PT_LOAD or memsz == 0:
            continue
        if filesz > memsz:
            raise ImageError(f"segment {k}: file size {filesz:#x} exceeds memory size {memsz:#x}")
        if vaddr != paddr:
            raise ImageError(f"segment {k}: virtual address {vaddr:#x} differs from physical {paddr:#x} "
                             f"(the boot map is an identity map)")
        if paddr < abi.RESERVED_END:
            raise ImageError(f"segment {k} at {paddr:#x} overlaps hypervisor memory below "
                             f"{abi.RESERVED_END:#x}")
        if paddr + memsz > ram_size:
            raise ImageError(f"segment {k} ({paddr:#x}-{paddr + memsz:#x}) does not fit in "
                             f"{ram_size >> 20} MiB of guest RAM")
        perm = R | (W if flags & PF_W else 0) | (X if flags & PF_X else 0)
        out.append(LoadSegment(k, paddr, memsz, data[offset:offset + filesz], perm))
    if not out:
        raise ImageError("no loadable segment")
    if len(out) > MAX_SEGMENTS:
        raise ImageError(f"{len(out)} loadable segments; at most {MAX_SEGMENTS} are supported")
    out.sort(key=lambda s: s.address)
    for a, b in zip(out, out[1:]):
        if b.address < a.end:
            raise ImageError(f"segments {a.index} and {b.index} overlap")
    return out


def _check_entry(entry: int, segments: list[LoadSegment]) -> None:
    if not any(s.perm & X and s.address <= entry < s.end for s in segments):
        raise ImageError(f"entry point {entry:#x} is not inside an executable segment")


def _u32_note(info: ElfInfo, ntype: int, what: str) -> int | None:
    desc = info.notes.get(ntype)
    if desc is None:
        return None
    if len(desc) != 4:
        raise ImageError(f"malformed PVTool {what} note: {len(desc)}-byte descriptor, expected 4")
    return int.from_bytes(desc, "little")


def _check_notes(info: ElfInfo) -> str:
    """The image's mode; refuses malformed PVTool notes."""
    version = _u32_note(info, abi.NOTE_ABI_VERSION, "ABI-version")
    if version is not None and version != abi.ABI_VERSION:
        raise ImageError(f"PV ABI version {version} is not supported (this runtime speaks {abi.ABI_VERSION})")
    mode = _u32_note(info, abi.NOTE_MODE, "mode")
    if mode not in (None, abi.MODE_NATIVE, abi.MODE_PV):
        raise ImageError(f"PVTool mode note has unknown mode {mode}")
    features = _u32_note(info, abi.NOTE_FEATURES, "features")
    if features is not None and features & ~_FEATURES:
        raise ImageError(f"PVTool features note has unknown bits {features & ~_FEATURES:#x}")
    page = info.notes.get(abi.NOTE_HYPERCALL_PAGE)
    if page is not None and len(page) != 8:
        raise ImageError(f"malformed PVTool hypercall-page note: {len(page)}-byte descriptor, expected 8")
    name = info.notes.get(abi.NOTE_GUEST_NAME)
    if name is not None and b"\0" not in name:
        raise ImageError("PVTool guest-name note is not NUL-terminated")
    return "pv" if mode == abi.MODE_PV else "native"


def _check_hypercall_page(page: int | None, segments: list[LoadSegment]) -> int:
    if page is None:
        raise ImageError("PV image has no hypercall-page note")
    if page % PAGE:
        raise ImageError(f"hypercall page {page:#x} is not page-aligned")
    if not any(s.perm & X and s.address <= page and page + PAGE <= s.end for s in segments):
        raise ImageError(f"hypercall page {page:#x} is not inside a text segment")
    return page


def hypercall_page_bytes() -> bytes:
    """What the runtime writes into a PV guest's hypercall page: a stub per number, int3 elsewhere."""
    stubs = b"".join(abi.hypercall_stub(nr) for nr in range(abi.HC_COUNT))
    return stubs + b"\xcc" * (PAGE - len(stubs))

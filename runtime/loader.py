"""The loader: an ELF64 x86-64 ET_EXEC image, checked before anything runs.

`load_image` reads the image with `pvimage.elfread`, the one reader of
images (it turns junk, truncation, ambiguous layouts and malformed notes
into a one-line `ImageError`), then refuses anything this machine cannot
run safely:

- every segment lies inside guest RAM, at or above 1 MiB (below is the
  hypervisor's);
- the entry point lies inside an executable segment;
- an image with a hypercall page must carry the PVTool notes;
- a PV image obeys the code rules R1-R7 (`pvimage.validate`, the validator
  `pvtool check` uses): no sensitive instruction can be reached.  What the
  validator returns (instruction starts, hypercall resume points) is kept
  for the run-time rule R8.

A native image is swept for sensitive instructions instead (`pvimage.sweep`):
trap mode hooks exactly those addresses.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

from pvimage import abi
from pvimage.elfread import ElfInfo, load
from pvimage.sweep import Finding, sweep_image
from pvimage.validate import ValidatedCode, validate

from .errors import ImageError
from .memory import PAGE, R, W, X

ET_EXEC = 2
MAX_SEGMENTS = 64


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
    sensitive: list[Finding] = field(default_factory=list)   # native: what the sweep found
    code: ValidatedCode | None = None                       # pv: what the validator proved

    def describe(self, address: int) -> str:
        """`0x100123 kmain+0x13 (hello.pvk:7)`."""
        return self.info.describe(address)


def load_image(data: bytes, ram_size: int) -> Image:
    """Parse and validate an image for a guest with `ram_size` bytes of RAM; ImageError if refused."""
    info = load(data)
    if struct.unpack_from("<H", data, 16)[0] != ET_EXEC:
        raise ImageError("not an ET_EXEC image (position-independent images cannot be loaded)")
    segments = _segments(info, ram_size)
    _check_entry(info.entry, segments)
    orphan = info.orphan_hypercall_page
    if orphan is not None:
        raise ImageError(f"image has a hypercall page at {orphan:#x} but no PVTool notes (mode, hypercall "
                         f"page): a PV guest must carry them (ckit/pvguest.ld writes them)")
    image = Image(info.entry, info.mode, segments, info)
    if info.mode == "pv":
        image.code = validate(info)
        image.hypercall_page = image.code.hypercall_page
    else:
        image.sensitive = sweep_image(info)
    return image


def _segments(info: ElfInfo, ram_size: int) -> list[LoadSegment]:
    """The image's segments (pvimage.elfread has refused overlaps and ambiguity), checked against the machine."""
    out = []
    for seg in info.segments:
        k = seg.index
        if seg.address < abi.RESERVED_END:
            raise ImageError(f"segment {k} at {seg.address:#x} overlaps hypervisor memory below "
                             f"{abi.RESERVED_END:#x}")
        if seg.end > ram_size:
            raise ImageError(f"segment {k} ({seg.address:#x}-{seg.end:#x}) does not fit in "
                             f"{ram_size >> 20} MiB of guest RAM")
        perm = R | (W if seg.writable else 0) | (X if seg.executable else 0)
        out.append(LoadSegment(k, seg.address, seg.memsz, seg.data, perm))
    if len(out) > MAX_SEGMENTS:
        raise ImageError(f"{len(out)} loadable segments; at most {MAX_SEGMENTS} are supported")
    return out


def _check_entry(entry: int, segments: list[LoadSegment]) -> None:
    if not any(s.perm & X and s.address <= entry < s.end for s in segments):
        raise ImageError(f"entry point {entry:#x} is not inside an executable segment")


def hypercall_page_bytes() -> bytes:
    """What the runtime writes into a PV guest's hypercall page: a stub per number, int3 elsewhere."""
    stubs = b"".join(abi.hypercall_stub(nr) for nr in range(abi.HC_COUNT))
    return stubs + b"\xcc" * (PAGE - len(stubs))

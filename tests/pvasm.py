"""Test support: PV images from GNU as source, linked with the kit's linker script.

`image(body)` assembles a conforming `_start` (it makes the shutdown
hypercall with status 7) followed by `body`, each in bundles of its own, so
a test controls every byte of the code the validator sees.  Images are
cached by source in the system temp directory.
"""
from __future__ import annotations

import hashlib
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from pvimage import abi

ROOT = Path(__file__).resolve().parents[1]
LDSCRIPT = ROOT / "ckit" / "pvguest.ld"

# mov edi, 7 (5 bytes), 22 bytes of nops, call shutdown's entry (5 bytes): the call ends the bundle.
START = f"""\
.section .text.start, "ax"
.globl _start
_start:
    mov $7, %edi
    .fill 22, 1, 0x90
    call hypercall_page + {abi.HC_SHUTDOWN * abi.HYPERCALL_STRIDE}
spin:
    jmp spin
    .balign 32, 0xcc
.text
.balign 32, 0xcc
.globl case
case:
"""


def have_binutils() -> bool:
    return shutil.which("as") is not None and shutil.which("ld") is not None


def image(body: str) -> bytes:
    """The PV image of START + `body` (GNU as, AT&T syntax; `.byte` for anything else)."""
    source = START + body + "\n"
    folder = Path(tempfile.gettempdir()) / "pvtool-pvasm"
    out = folder / f"{hashlib.sha256(source.encode() + LDSCRIPT.read_bytes()).hexdigest()[:20]}.elf"
    if not out.exists():
        folder.mkdir(exist_ok=True)
        with tempfile.TemporaryDirectory(dir=folder) as tmp:
            src, obj, elf = (Path(tmp) / n for n in ("case.s", "case.o", "case.elf"))
            src.write_text(source)
            subprocess.run(["as", "--64", "-o", str(obj), str(src)], check=True, capture_output=True)
            subprocess.run(["ld", "-T", str(LDSCRIPT), "--build-id=none", "-z", "max-page-size=4096",
                            "-o", str(elf), str(obj)], check=True, capture_output=True)
            elf.replace(out)
    return out.read_bytes()


def hexbytes(h: str) -> str:
    """A `.byte` line for hex bytes: whatever the assembler would not write itself."""
    return ".byte " + ", ".join(f"0x{b:02x}" for b in bytes.fromhex(h))


def symbol(data: bytes, name: str) -> int:
    from pvimage.elfread import load
    fn = load(data).function(name)
    assert fn is not None, name
    return fn.address


# -- byte surgery on headers -----------------------------------------------------------------

PHDR = struct.Struct("<IIQQQQQQ")
PHDR_FIELDS = ("type", "flags", "offset", "vaddr", "paddr", "filesz", "memsz", "align")


def phdrs(data: bytes) -> list[tuple[int, list[int]]]:
    """(file offset, fields) of every program header."""
    phoff, = struct.unpack_from("<Q", data, 32)
    phnum, = struct.unpack_from("<H", data, 56)
    return [(phoff + k * PHDR.size, list(PHDR.unpack_from(data, phoff + k * PHDR.size))) for k in range(phnum)]


def patch_phdr(data: bytes, k: int, **fields: int) -> bytes:
    off, values = phdrs(data)[k]
    for name, value in fields.items():
        values[PHDR_FIELDS.index(name)] = value
    out = bytearray(data)
    PHDR.pack_into(out, off, *values)
    return bytes(out)


def patch(data: bytes, offset: int, fmt: str, *values: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, *values)
    return bytes(out)

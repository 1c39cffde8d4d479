"""Machine code the runtime runs in its own process, written as annotated listings.

A listing is a list of (instruction, hex bytes) pairs, the instruction
spelled as capstone prints it; a label is ("name:", ""), a short jump
(jump mnemonic, label).  `assemble` turns a listing into bytes; `CodePage`
maps named pieces once, writable, then executable and never written again.
The pieces (gate.py, watchdog.py) are few and small; a test disassembles
each and compares every line with its listing, so a wrong byte cannot hide
behind its comment.
"""
from __future__ import annotations

import ctypes
import mmap
import os

Listing = list[tuple[str, str]]
JUMPS = {"je": 0x74, "jne": 0x75, "jg": 0x7F, "jbe": 0x76, "jmp": 0xEB}   # the short (rel8) forms


def assemble(code: Listing) -> bytes:
    """The bytes of a listing."""
    labels = label_offsets(code)
    out = bytearray()
    for text, data in code:
        if text in JUMPS:
            rel = labels[data] - (len(out) + 2)
            if not -128 <= rel < 128:
                raise AssertionError(f"internal error: jump to {data} out of short range")
            out += bytes((JUMPS[text], rel & 0xFF))
        else:
            out += bytes.fromhex(data)
    return bytes(out)


def label_offsets(code: Listing) -> dict[str, int]:
    """Where each label of a listing lands (for the tests)."""
    at, labels = 0, {}
    for text, data in code:
        if text.endswith(":"):
            labels[text[:-1]] = at
        at += 2 if text in JUMPS else len(data) // 2
    return labels


class CodePage:
    """Named pieces of machine code, mapped executable for the life of the process."""

    def __init__(self, pieces: dict[str, Listing]) -> None:
        image, self._entry = b"", {}
        for name, code in pieces.items():
            self._entry[name] = len(image)
            data = assemble(code)
            image += data.ljust(-(-len(data) // 16) * 16, b"\xcc")
        size = -(-len(image) // mmap.PAGESIZE) * mmap.PAGESIZE
        self._map = mmap.mmap(-1, size, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._map.write(image)
        self._base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(self._base, size, mmap.PROT_READ | mmap.PROT_EXEC):
            err = ctypes.get_errno()
            raise OSError(err, f"cannot map the runtime's machine code executable: {os.strerror(err)}")

    def address(self, name: str) -> int:
        return self._base + self._entry[name]

"""The debug-exit port 0xf4: a write ends the run with the low byte as status.

QEMU's isa-debug-exit reports `(byte << 1) | 1`; the bundled runtime reports
the byte itself, which is what a kernel's `kmain` returned.
"""
from __future__ import annotations

from ..errors import Shutdown

PORT = 0xF4


class DebugExit:
    def io_read(self, port: int, size: int) -> int:
        return 0

    def io_write(self, port: int, size: int, value: int) -> None:
        raise Shutdown(value & 0xFF)

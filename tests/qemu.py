"""Test support: boot an ELF image on QEMU (microvm, PVH) and collect what it did.

The guest's console is COM1, captured to a file; its exit status comes from
the isa-debug-exit device at port 0xf4, which makes QEMU exit with
(status << 1) | 1.  Any other way of stopping (a triple fault with
-no-reboot exits 0, a hang hits the timeout) raises BootError.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

QEMU = "qemu-system-x86_64"



def available() -> bool:
    return shutil.which(QEMU) is not None


requires_qemu = pytest.mark.skipif(not available(), reason=f"{QEMU} is not installed")


class BootError(Exception):
    """The guest did not end through the debug-exit port; `console` holds its output so far."""

    def __init__(self, message: str, console: str = "") -> None:
        super().__init__(f"{message}; console: {console!r}")
        self.console = console


def command(image: Path, serial: Path) -> list[str]:
    return [QEMU, "-M", "microvm", "-no-reboot", "-nodefaults", "-kernel", str(image),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-serial", f"file:{serial}", "-display", "none", "-monitor", "none"]


def boot(image: str | Path | bytes, timeout: float = 20) -> tuple[str, int]:
    """Boot `image` (a path or the ELF bytes); return (console text, exit status)."""
    with tempfile.TemporaryDirectory(prefix="pvtool-qemu-") as tmp:
        if isinstance(image, bytes):
            path = Path(tmp) / "image.elf"
            path.write_bytes(image)
        else:
            path = Path(image)
        serial = Path(tmp) / "console.txt"
        try:
            proc = subprocess.run(command(path, serial), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BootError(f"QEMU timed out after {timeout} s", _read(serial)) from None
        console = _read(serial)
        if proc.returncode % 2 == 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise BootError(f"QEMU exited with {proc.returncode} (not via debug-exit) {stderr}", console)
        return console, proc.returncode >> 1


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""

"""Test support: boot an ELF image on QEMU (microvm, PVH) and collect what it did.

The guest's console is COM1, captured to a file; its exit status comes from
the isa-debug-exit device at port 0xf4, which makes QEMU exit with
(status << 1) | 1.  `accel="kvm"` boots under KVM, whose local APIC is in
the kernel (and enforces what QEMU's own APIC does not).  Any other way of stopping (a triple fault with
-no-reboot exits 0, a hang hits the timeout) raises BootError.
"""
from __future__ import annotations

import os
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


def command(image: Path, serial: Path, accel: str = "tcg") -> list[str]:
    return [QEMU, "-M", "microvm", "-accel", accel, "-no-reboot", "-nodefaults", "-kernel", str(image),
            "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04",
            "-serial", f"file:{serial}", "-display", "none", "-monitor", "none"]


def kvm_usable() -> str:
    """'' if QEMU can boot with KVM here, else why not (for a skip message)."""
    if not available():
        return f"{QEMU} is not installed"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is missing or not usable"
    probe = subprocess.run([QEMU, "-accel", "kvm", "-M", "microvm", "-nodefaults", "-display", "none",
                            "-S", "-monitor", "none", "-no-reboot", "-kernel", "/dev/null"],
                           capture_output=True, timeout=30)
    err = probe.stderr.decode(errors="replace")
    if "kvm" in err.lower() and ("failed" in err.lower() or "not" in err.lower()):
        return f"KVM is not usable: {err.strip().splitlines()[-1]}"
    return ""


def boot(image: str | Path | bytes, timeout: float = 20, accel: str = "tcg") -> tuple[str, int]:
    """Boot `image` (a path or the ELF bytes); return (console text, exit status)."""
    with tempfile.TemporaryDirectory(prefix="pvtool-qemu-") as tmp:
        if isinstance(image, bytes):
            path = Path(tmp) / "image.elf"
            path.write_bytes(image)
        else:
            path = Path(image)
        serial = Path(tmp) / "console.txt"
        try:
            proc = subprocess.run(command(path, serial, accel), capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise BootError(f"QEMU timed out after {timeout} s", _read(serial)) from None
        console = _read(serial)
        if proc.returncode % 2 == 0:
            stderr = proc.stderr.decode(errors="replace").strip()
            raise BootError(f"QEMU exited with {proc.returncode} (not via debug-exit) {stderr}", console)
        return console, proc.returncode >> 1


def _read(path: Path) -> str:
    return path.read_bytes().decode(errors="replace") if path.exists() else ""

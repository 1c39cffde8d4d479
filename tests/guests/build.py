"""Build the C test guests with gcc: `build(name)` -> path of the ELF image.

Each guest is one C file in this directory (plus pv.h or native.h and
guest.ld); images are cached by the hash of their sources in the system
temp directory, so a test session compiles each guest once.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CFLAGS = ["-ffreestanding", "-nostdlib", "-static", "-no-pie", "-O2", "-g", "-mno-red-zone", "-fno-pic",
          "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
          "-Wall", "-Wno-unused-function"]
LDFLAGS = ["-Wl,-T," + str(HERE / "guest.ld"), "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096"]


class BuildError(Exception):
    pass


def have_gcc() -> bool:
    return shutil.which("gcc") is not None


def build(name: str, extra: list[str] | None = None) -> Path:
    """Compile tests/guests/<name>.c (with `extra` flags) and return the image path."""
    src = HERE / f"{name}.c"
    flags = CFLAGS + (extra or [])
    digest = hashlib.sha256()
    for part in (src, HERE / "pv.h", HERE / "native.h", HERE / "guest.ld"):
        digest.update(part.read_bytes())
    digest.update(" ".join(flags).encode())
    out = Path(tempfile.gettempdir()) / "pvtool-guests" / f"{name}-{digest.hexdigest()[:16]}.elf"
    if not out.exists():
        out.parent.mkdir(exist_ok=True)
        tmp = out.with_suffix(".tmp")
        done = subprocess.run(["gcc", *flags, *LDFLAGS, "-o", str(tmp), str(src)],
                              capture_output=True, text=True, cwd=HERE)
        if done.returncode:
            raise BuildError(f"gcc failed for {name}.c:\n{done.stderr}")
        tmp.replace(out)
    return out

"""Build C guests with gcc and the kit: the one helper every test that needs gcc uses.

`build(name)` compiles ckit/guests/<name>.c; `build_source(name, text)`
compiles C text.  A guest that includes "native.h" is a native guest
(native.ld, no code rules); any other is a PV guest built with the kit:
pvguest.h, bundle.s and pvguest.ld, with the flags docs/abi.md gives.
Images are cached by the hash of their inputs in the system temp directory,
so a test session compiles each guest once.
"""
from __future__ import annotations

import hashlib
import shutil
import subprocess
import tempfile
from pathlib import Path

KIT = Path(__file__).resolve().parent
GUESTS = KIT / "guests"

# The flags docs/abi.md ("Writing a guest in C") documents.
COMMON_CFLAGS = ["-ffreestanding", "-nostdlib", "-static", "-no-pie", "-fno-pic", "-mno-red-zone",
                 "-fno-stack-protector", "-fcf-protection=none", "-fno-asynchronous-unwind-tables",
                 "-O2", "-g", "-Wall", "-Wno-unused-function"]
PV_CFLAGS = ["-fno-jump-tables", f"-Wa,{KIT / 'bundle.s'}", f"-I{KIT}"]
PV_LDFLAGS = [f"-Wl,-T,{KIT / 'pvguest.ld'}", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096"]
NATIVE_LDFLAGS = [f"-Wl,-T,{GUESTS / 'native.ld'}", "-Wl,--build-id=none", "-Wl,-z,max-page-size=4096"]


class BuildError(Exception):
    pass


def have_gcc() -> bool:
    return shutil.which("gcc") is not None


def is_native(source: str) -> bool:
    return '#include "native.h"' in source


def command(src: Path, out: Path, native: bool, extra: list[str] | None = None) -> list[str]:
    """The gcc command line for one guest."""
    flags = COMMON_CFLAGS + ([] if native else PV_CFLAGS) + (extra or [])
    return ["gcc", *flags, *(NATIVE_LDFLAGS if native else PV_LDFLAGS), "-o", str(out), str(src)]


def build(name: str, extra: list[str] | None = None) -> Path:
    """Compile ckit/guests/<name>.c (with `extra` flags) and return the image path."""
    return build_source(name, (GUESTS / f"{name}.c").read_text(), extra)


def build_source(name: str, source: str, extra: list[str] | None = None) -> Path:
    """Compile C `source` as <name>.c (it may include the kit's and the guests' headers); the image path.

    The source is compiled under its short name, so debug info and fault
    reports say `name.c:LINE`."""
    native = is_native(source)
    digest = hashlib.sha256(source.encode())
    for part in (KIT / "pvguest.h", KIT / "pvguest.ld", KIT / "bundle.s", GUESTS / "native.h", GUESTS / "native.ld"):
        digest.update(part.read_bytes())
    digest.update(" ".join(extra or []).encode())
    folder = Path(tempfile.gettempdir()) / "pvtool-guests" / f"{name}-{digest.hexdigest()[:16]}"
    out = folder / f"{name}.elf"
    if out.exists():
        return out
    folder.mkdir(parents=True, exist_ok=True)
    src, tmp = folder / f"{name}.c", folder / f"{name}.tmp"
    src.write_text(source)
    done = subprocess.run(command(Path(src.name), Path(tmp.name), native, [f"-I{GUESTS}", *(extra or [])]),
                          capture_output=True, text=True, cwd=folder)
    if done.returncode:
        raise BuildError(f"gcc failed for {name}.c:\n{done.stderr}")
    tmp.replace(out)
    return out

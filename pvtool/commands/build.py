"""`pvtool build`: compile a PVK kernel into an ELF64 image."""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .. import driver
from ..errors import USER_ERRORS


def register(sub) -> None:
    p = sub.add_parser(
        "build", help="compile a .pvk kernel to an ELF64 image",
        description="Compile a PVK kernel to an x86-64 ELF64 image linked at 1 MiB. "
                    "--target pv (the default) rewrites every sensitive operation into "
                    "hypercalls and shared-page accesses for the bundled hypervisor; "
                    "--target native keeps the real instructions and boots on QEMU (PVH).")
    p.add_argument("source", metavar="SRC.pvk", help="the kernel's main source file")
    p.add_argument("-o", "--output", metavar="OUT",
                   help="output image (default: SRC without .pvk, plus .pv.elf or .native.elf)")
    p.add_argument("--target", choices=driver.TARGETS, default="pv",
                   help="pv (default): paravirtualized; native: real privileged instructions")
    p.add_argument("--emit-ir", action="store_true",
                   help="print the IR (after the PV pass for --target pv) instead of writing an image")
    p.set_defaults(func=run)


def default_output(source: str, target: str) -> str:
    return str(Path(source).with_suffix("")) + f".{target}.elf"


def run(args: argparse.Namespace) -> int:
    try:
        if args.emit_ir:
            from .. import ir
            print(ir.dump(driver.compile_ir(args.source, args.target)))
            return 0
        image = driver.compile_file(args.source, args.target)
    except USER_ERRORS as e:
        print(e, file=sys.stderr)
        return 1
    out = args.output or default_output(args.source, args.target)
    try:
        with open(out, "wb") as f:
            f.write(image)
        os.chmod(out, 0o755)
    except OSError as e:
        print(f"pvtool build: cannot write {out}: {e.strerror}", file=sys.stderr)
        return 1
    return 0

"""`pvtool diff`: a kernel's native and paravirtual builds side by side.

Given one PVK source it builds both targets in memory; given two images it
reads them (native first).  The view itself lives in pvtool/tools/diffview.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pvimage.elfread import ElfInfo, ImageError, load, load_file

from ..tools.diffview import diff_images, render, to_json

EPILOG = """\
examples:
  pvtool diff kernels/churn.pvk               # build both ways, compare
  pvtool diff k.native.elf k.pv.elf --full    # two images, every instruction
  pvtool diff kernels/mm.pvk --json | jq .summary

Each sensitive site of the native build is shown next to what the PV build
made of it (its source line and the PV site's description); the code
between sites is aligned instruction by instruction ('|' same, '*' changed,
'<' native only, '>' PV only). The summary counts sites per operation, the
exits avoided (sites that no longer leave the guest), batched hypercalls,
and the text size of both builds.

exit status: 0 success, 1 compile error, 2 unreadable input."""


def register(sub) -> None:
    p = sub.add_parser(
        "diff", help="show what the PV pass changed, native and PV side by side",
        description="Compare a kernel's native and paravirtualized builds function by\n"
                    "function: either build SRC.pvk both ways in memory, or read two\n"
                    "images, native first.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="SRC.pvk | NATIVE.elf PV.elf",
                   help="one kernel source, or a native image and a PV image")
    p.add_argument("--json", action="store_true", help="print one JSON object (functions, sites, summary)")
    p.add_argument("--color", choices=("auto", "always", "never"), default="auto",
                   help="ANSI colour: auto (the default) colours only a terminal")
    p.add_argument("--full", action="store_true", help="list every instruction; do not fold identical runs")
    p.add_argument("--summary", action="store_true", help="print only the summary, not the listing")
    p.set_defaults(func=run)


class _Fail(Exception):
    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


def run(args: argparse.Namespace) -> int:
    try:
        native, pv, names = _inputs(args.inputs)
    except _Fail as e:
        print(e, file=sys.stderr)
        return e.status
    d = diff_images(native, pv, *names)
    if args.json:
        print(json.dumps(to_json(d), indent=2))
    else:
        print(render(d, color=_want_color(args.color), full=args.full, summary_only=args.summary))
    return 0


def _want_color(choice: str) -> bool:
    if choice != "auto":
        return choice == "always"
    return sys.stdout.isatty() and "NO_COLOR" not in os.environ and os.environ.get("TERM") != "dumb"


def _inputs(paths: list[str]) -> tuple[ElfInfo, ElfInfo, tuple[str, str]]:
    if len(paths) == 1:
        return (*_build_both(paths[0]), (f"{paths[0]} (native build)", f"{paths[0]} (pv build)"))
    if len(paths) != 2:
        raise _Fail("pvtool diff: give one SRC.pvk, or two images (native, then pv)", 2)
    native, pv = (_read(p) for p in paths)
    if native.mode == "pv" or (pv.has_pv_notes and pv.mode != "pv"):
        raise _Fail(f"pvtool diff: expected the native image first and the PV image second "
                    f"({paths[0]} is {native.mode}, {paths[1]} is {pv.mode})", 2)
    return native, pv, (paths[0], paths[1])


def _read(path: str) -> ElfInfo:
    try:
        return load_file(path)
    except ImageError as e:
        reason = str(e)
        raise _Fail(f"pvtool diff: {reason if reason.startswith(path) else f'{path}: {reason}'}", 2) from None


def _build_both(path: str) -> tuple[ElfInfo, ElfInfo]:
    source = Path(path)
    if not source.is_file():
        raise _Fail(f"pvtool diff: {path}: {'not a file' if source.exists() else 'No such file or directory'}", 2)
    if source.read_bytes()[:4] == b"\x7fELF":
        raise _Fail(f"pvtool diff: {path} is an ELF image: give the native and the PV image both", 2)
    try:                                  # the compiler, only when there is something to compile
        from .. import driver
        from ..errors import USER_ERRORS
    except ImportError as e:
        raise _Fail(f"pvtool diff: the compiler is not available in this build ({e})", 1) from None
    images = []
    for target in ("native", "pv"):
        try:
            data = driver.compile_file(path, target)
        except USER_ERRORS as e:
            raise _Fail(str(e), 1) from None
        try:
            images.append(load(data))
        except ImageError as e:
            raise _Fail(f"pvtool diff: the {target} build of {path} is unreadable: {e}", 1) from None
    return images[0], images[1]

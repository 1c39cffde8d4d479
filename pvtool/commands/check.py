"""`pvtool check`: does an image obey the PV code rules; which sensitive instructions does it hold.

A paravirtual image is checked against the code rules R1-R7 with the
validator the runtime's loader uses (`pvimage.validate`), and every
violation is listed; a native image is swept for its sensitive
instructions (`pvimage.sweep`).  Exit 0 only for a PV image that obeys the
rules, 1 otherwise, 2 when the file cannot be read as an ELF64 x86-64 image.
"""
from __future__ import annotations

import argparse
import json
import sys

from pvimage.elfread import ElfInfo, ImageError, load_file
from pvimage.sweep import Finding, sweep_image
from pvimage.validate import Violation, violations

EPILOG = """\
categories:
  privileged              faults outside ring 0 (cli, hlt, in/out, mov crN, lgdt, wrmsr, iretq, ...)
  sensitive-unprivileged  runs in any ring but reads or changes virtualized state
                          (pushf/popf, sgdt/sidt, segment-register moves, far jumps,
                          cpuid, rdtsc, ...)

A PV image is checked against the code rules instead (docs/abi.md, section 8):
  R1 code extent, W^X   R2 hypercall page   R3 32-byte bundles of whole instructions
  R4 no sensitive instruction, ret, jmp/call through memory or xbegin
  R5 direct branches to instruction starts or hypercall entries
  R6 jmp/call r64 right after 'and r64, -32' in its bundle   R7 entry at a bundle start

exit status: 0 a PV image that obeys the code rules, 1 any violation or
sensitive instruction (or not a PV image), 2 unreadable input."""


def register(sub) -> None:
    p = sub.add_parser(
        "check", help="check a PV image against the code rules; list a native image's sensitive instructions",
        description="Check an ELF64 x86-64 image (ours or any other compiler's). A PV image is\n"
                    "validated against the code rules (the loader's validator) and every violation\n"
                    "is listed with its address, function and source line; a native image is swept\n"
                    "and each sensitive instruction listed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("image", metavar="IMAGE", help="an ELF64 x86-64 executable")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        info = load_file(args.image)
    except ImageError as e:
        reason = str(e)
        print(f"pvtool check: {reason if reason.startswith(args.image) else f'{args.image}: {reason}'}",
              file=sys.stderr)
        return 2
    if info.mode == "pv":
        broken = violations(info)
        passed = not broken
        doc = report_pv(args.image, broken) if args.json else render_pv(args.image, broken)
    else:
        findings = sweep_image(info)
        passed = False
        doc = report(args.image, info, findings) if args.json else render(args.image, info, findings)
    print(json.dumps(doc, indent=2) if args.json else doc)
    return 0 if passed else 1


def report_pv(image: str, broken: list[Violation]) -> dict:
    return {"image": image, "mode": "pv", "passed": not broken,
            "findings": [{"rule": v.rule, "address": v.address, "message": str(v)} for v in broken]}


def render_pv(image: str, broken: list[Violation]) -> str:
    if not broken:
        return f"{image}: paravirtual, obeys the code rules (no reachable sensitive instruction)"
    n = len(broken)
    return "\n".join([f"{image}: paravirtual, {n} code-rule violation{'s' if n != 1 else ''}"]
                     + [f"  {v}" for v in broken])


def report(image: str, info: ElfInfo, findings: list[Finding]) -> dict:
    return {
        "image": image,
        "mode": info.mode,
        "passed": False,
        "findings": [{"address": f.address, "size": f.size, "mnemonic": f.mnemonic,
                      "operands": f.op_str, "category": f.category, "function": f.function,
                      "file": f.file, "line": f.line, "why": f.why} for f in findings],
    }


def _where(info: ElfInfo, f: Finding) -> str:
    hit = info.function_at(f.address)
    return f"{hit[0].name}+{hit[1]:#x}" if hit else "?"


def render(image: str, info: ElfInfo, findings: list[Finding]) -> str:
    """A native image's sweep."""
    kind = "native" if info.has_pv_notes else "native (no PVTool note)"
    if info.orphan_hypercall_page is not None:
        kind = "native (no PVTool note, yet it has a hypercall page: a PV guest whose notes are missing)"
    if not findings:
        return f"{image}: {kind}, no sensitive instruction found, but not a paravirtual image"
    n = len(findings)
    lines = [f"{image}: {kind}, {n} sensitive instruction{'s' if n != 1 else ''}"]
    rows = [(f"{f.address:#x}", _where(info, f), f.asm, f.category,
             f"{f.file}:{f.line}" if f.file else "") for f in findings]
    widths = [max(len(r[k]) for r in rows) for k in range(4)]
    for r in rows:
        cells = [c.ljust(w) for c, w in zip(r, widths)] + [r[4]]
        lines.append("  " + "  ".join(cells).rstrip())
    return "\n".join(lines)

"""`pvtool check`: list the sensitive instructions left in an ELF64 x86-64 image.

Exit 0 only for a paravirtual image with none left, 1 otherwise (a native
image is reported with all its sensitive instructions), 2 when the file
cannot be read as an ELF64 x86-64 image.
"""
from __future__ import annotations

import argparse
import json
import sys

from pvimage.elfread import ElfInfo, ImageError, load_file
from pvimage.sweep import Finding, sweep_image

EPILOG = """\
categories:
  privileged              faults outside ring 0 (cli, hlt, in/out, mov crN, lgdt, wrmsr, iretq, ...)
  sensitive-unprivileged  runs in any ring but reads or changes virtualized state
                          (pushf/popf, sgdt/sidt, segment-register moves, far jumps,
                          cpuid, rdtsc, ...)

exit status: 0 a PV image with no sensitive instruction, 1 anything found
(or not a PV image), 2 unreadable input."""


def register(sub) -> None:
    p = sub.add_parser(
        "check", help="list sensitive instructions left in an ELF image",
        description="Disassemble every executable segment of an ELF64 x86-64 image (ours or\n"
                    "any other compiler's) and list each sensitive instruction with its address,\n"
                    "function and source line. The hypercall page of a PV image is skipped: the\n"
                    "hypervisor writes it.",
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
    findings = sweep_image(info)
    passed = info.mode == "pv" and not findings
    if args.json:
        print(json.dumps(report(args.image, info, findings, passed), indent=2))
    else:
        print(render(args.image, info, findings))
    return 0 if passed else 1


def report(image: str, info: ElfInfo, findings: list[Finding], passed: bool) -> dict:
    return {
        "image": image,
        "mode": info.mode,
        "passed": passed,
        "findings": [{"address": f.address, "size": f.size, "mnemonic": f.mnemonic,
                      "operands": f.op_str, "category": f.category, "function": f.function,
                      "file": f.file, "line": f.line, "why": f.why} for f in findings],
    }


def _where(info: ElfInfo, f: Finding) -> str:
    hit = info.function_at(f.address)
    return f"{hit[0].name}+{hit[1]:#x}" if hit else "?"


def render(image: str, info: ElfInfo, findings: list[Finding]) -> str:
    kind = "paravirtual" if info.mode == "pv" else "native" if info.has_pv_notes else "native (no PVTool note)"
    if not findings:
        if info.mode == "pv":
            return f"{image}: paravirtual, no sensitive instruction"
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

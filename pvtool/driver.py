"""The compiler driver: runs the stages in order, source to ELF image.

Each stage is one module; data flows one way:
parse -> check -> lower -> [paravirt] -> x86 codegen -> link -> ELF.
"""
from __future__ import annotations

from pathlib import Path

from . import elfwrite, ir, link, lower, parse, paravirt, typecheck
from .x86 import codegen

TARGETS = ("pv", "native")


def compile_ir(path: str, target: str = "pv") -> ir.Module:
    """Source file to IR for `target` (the PV pass applied for 'pv')."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}")
    program = typecheck.check(parse.parse_program(path))
    module = lower.lower(program)
    if target == "pv":
        module = paravirt.paravirtualize(module)
    return module


def compile_file(path: str, target: str = "pv") -> bytes:
    """Source file to the bytes of an ELF64 image for `target`."""
    obj = codegen.generate(compile_ir(path, target))
    obj.name = Path(path).stem
    return elfwrite.write(link.link(obj))

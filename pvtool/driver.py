"""The compiler driver: the stages in order, source to ELF image.

Each stage is one module and takes the previous one's output:
parse -> typecheck -> lower -> [paravirt] -> x86 codegen -> link -> elfwrite.
A CompileError from any stage leaves here with the source texts it quotes.
"""
from __future__ import annotations

from pathlib import Path

from . import ast, elfwrite, ir, link, lower, parse, paravirt, typecheck
from .diagnostics import quoting
from .errors import InternalError
from .x86 import codegen

TARGETS = ("pv", "native")


def compile_ir(path: str, target: str = "pv") -> ir.Module:
    """Source file to IR for `target` (the PV pass applied for 'pv')."""
    _check_target(target)
    return _middle(parse.parse_program(path), target)


def compile_file(path: str, target: str = "pv") -> bytes:
    """Source file to the bytes of an ELF64 image for `target`."""
    _check_target(target)
    program = parse.parse_program(path)
    with quoting(program.sources):
        obj = codegen.generate(_middle(program, target))
    obj.name = Path(path).stem
    return elfwrite.write(link.link(obj))


def _middle(program: ast.Program, target: str) -> ir.Module:
    with quoting(program.sources):
        module = lower.lower(typecheck.check(program))
        return paravirt.paravirtualize(module) if target == "pv" else module


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise InternalError("driver", f"unknown target {target!r}")

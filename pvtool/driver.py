"""The compiler driver: the stages in order, source to ELF image.

Each stage is one module and takes the previous one's output:
parse -> typecheck -> lower -> [paravirt] -> x86 codegen -> link -> elfwrite.
A CompileError from any stage leaves here with the source texts it quotes.
The cyclic garbage collector is paused while the stages run (see
`collector_paused`).
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from . import ast, elfwrite, ir, link, lower, parse, paravirt, typecheck
from .diagnostics import quoting
from .errors import InternalError
from .x86 import codegen

TARGETS = ("pv", "native")


def compile_ir(path: str, target: str = "pv") -> ir.Module:
    """Source file to IR for `target` (the PV pass applied for 'pv')."""
    _check_target(target)
    with collector_paused():
        return _middle(parse.parse_program(path), target)


def compile_file(path: str, target: str = "pv") -> bytes:
    """Source file to the bytes of an ELF64 image for `target`."""
    _check_target(target)
    with collector_paused():
        return _image(path, target)


def _image(path: str, target: str) -> bytes:
    # Its own frame, so the tree, the IR and the object code are freed as it
    # returns, before the collector is back (see `collector_paused`).
    program = parse.parse_program(path)
    with quoting(program.sources):
        obj = codegen.generate(_middle(program, target))
    obj.name = Path(path).stem
    return elfwrite.write(link.link(obj))


@contextmanager
def collector_paused() -> Iterator[None]:
    """Run without the cyclic garbage collector.  The stages allocate hundreds
    of thousands of objects that all live until the image is written; each
    collection would walk them again for nothing (it costs a third of a
    compile).  Whatever is cyclic garbage is collected after: the first
    allocation after the collector is back walks every object allocated
    meanwhile and still tracked, so callers let their data die first, and the
    stages avoid reference cycles in what they build (the syntax tree's
    function symbols, the DWARF writer)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _middle(program: ast.Program, target: str) -> ir.Module:
    with quoting(program.sources):
        module = lower.lower(typecheck.check(program))
        return paravirt.paravirtualize(module) if target == "pv" else module


def _check_target(target: str) -> None:
    if target not in TARGETS:
        raise InternalError("driver", f"unknown target {target!r}")

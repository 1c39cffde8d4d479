"""Compile errors and the source text they quote.

Every front-end failure is a `CompileError`: one location, one message,
printed as `FILE:LINE:COL: error: MESSAGE`, then the source line and a caret
under the column.  The parser registers each file's text here so any later
stage can quote it without reading the file again.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from .ir import Loc

_SOURCES: dict[str, str] = {}

# Front-end recursion follows the nesting of the program; the parser caps that
# nesting, and this limit leaves room for a few frames per level.
MAX_NESTING = 256
_RECURSION_LIMIT = 6000


def remember_source(path: str, text: str) -> None:
    _SOURCES[path] = text


def source_line(path: str, line: int) -> str | None:
    text = _SOURCES.get(path)
    if text is None:
        return None
    lines = text.split("\n")
    if 1 <= line <= len(lines):
        return lines[line - 1].rstrip("\r")
    return None


class CompileError(Exception):
    """A diagnosed error in the program being compiled."""

    def __init__(self, loc: Loc | None, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message

    def format(self) -> str:
        if self.loc is None:
            return f"error: {self.message}"
        if self.loc.line <= 0:
            return f"{self.loc.file}: error: {self.message}"
        head = f"{self.loc}: error: {self.message}"
        text = source_line(self.loc.file, self.loc.line)
        if text is None:
            return head
        # Keep tabs so the caret lines up in a terminal.
        pad = "".join(c if c == "\t" else " " for c in text[: self.loc.col - 1])
        return f"{head}\n{text}\n{pad}^"

    def __str__(self) -> str:
        return self.format()


@contextmanager
def deep_recursion() -> Iterator[None]:
    """Give the front end's recursive walks room for MAX_NESTING levels."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, _RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)

"""Compile errors: the one kind of failure the front end reports.

Every front-end failure is a `CompileError`: one location, one message,
printed as `FILE:LINE:COL: error: MESSAGE`, then the source line and a caret
under the column.  The error quotes the line from `sources`, the texts of
the files read so far: whoever holds them attaches them (the parser for its
own errors, the driver for later stages') before the error is reported.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator

from .errors import UserError
from .source import Loc, Sources, source_line

# The parser caps the nesting of the syntax tree; the recursive walks of the
# later stages need a few frames per level of it.
MAX_NESTING = 256
_RECURSION_LIMIT = 6000


class CompileError(UserError):
    """A diagnosed error in the program being compiled."""

    def __init__(self, loc: Loc | None, message: str):
        super().__init__(message)
        self.loc = loc
        self.message = message
        self.sources: Sources = {}

    def format(self, sources: Sources | None = None) -> str:
        """The report: location, message, and the line quoted from `sources`
        (by default the texts attached to the error)."""
        if self.loc is None:
            return f"error: {self.message}"
        if self.loc.line <= 0:
            return f"{self.loc.file}: error: {self.message}"
        head = f"{self.loc}: error: {self.message}"
        text = source_line(self.sources if sources is None else sources, self.loc)
        if text is None:
            return head
        # Keep tabs so the caret lines up in a terminal.
        pad = "".join(c if c == "\t" else " " for c in text[: self.loc.col - 1])
        return f"{head}\n{text}\n{pad}^"

    def __str__(self) -> str:
        return self.format()


@contextmanager
def quoting(sources: Sources) -> Iterator[None]:
    """Attach `sources` to a CompileError passing through, unless it has its own."""
    try:
        yield
    except CompileError as e:
        if not e.sources:
            e.sources = sources
        raise


@contextmanager
def deep_recursion() -> Iterator[None]:
    """Give the front end's recursive walks room for MAX_NESTING levels."""
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(max(old, _RECURSION_LIMIT))
    try:
        yield
    finally:
        sys.setrecursionlimit(old)

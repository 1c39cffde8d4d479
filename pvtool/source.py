"""Source positions and source texts: what the front end knows about the files it read.

`Loc` is a position in a source file.  The parser gives one to every syntax
node; `lower` copies them onto IR instructions, and the back end turns them
into the DWARF line table and the `.pv.sites` records.  Later stages import
`Loc` from here; this module imports nothing of pvtool's.

`Sources` maps each file the parser read to its text, so an error can quote
the line it points at without reading the file again.
"""
from __future__ import annotations

from typing import Mapping, NamedTuple

Sources = Mapping[str, str]


class Loc(NamedTuple):
    """A source position: file path as given to the compiler, 1-based line and column.

    A tuple rather than a dataclass: every node and instruction carries one,
    and a tuple is the cheapest immutable value to make.  Line 0 means the
    file as a whole."""
    file: str
    line: int
    col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


def source_line(sources: Sources, loc: Loc) -> str | None:
    """The text of the line `loc` points at, without its line break; None if unknown."""
    text = sources.get(loc.file)
    if text is None or loc.line < 1:
        return None
    start = 0
    for _ in range(loc.line - 1):
        start = text.find("\n", start) + 1
        if start == 0:
            return None
    end = text.find("\n", start)
    return (text[start:] if end < 0 else text[start:end]).rstrip("\r")

"""What a kernel promises in its header: its console output and exit status.

    // expect-exit: N          the status it ends with (the byte written to port 0xf4)
    // | LINE                  each console line, in order

The test suite and the benchmarks check every run against this.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Expectation:
    path: Path
    output: str
    status: int

    @property
    def name(self) -> str:
        return self.path.stem


def expectation(path: Path) -> Expectation:
    """Parse the header of the kernel at `path`; ValueError if it has none."""
    text = Path(path).read_text()
    m = re.search(r"^// expect-exit: (\d+)$", text, re.M)
    if not m:
        raise ValueError(f"{path}: no '// expect-exit:' header")
    lines = re.findall(r"^// \| (.*)$", text, re.M)
    return Expectation(Path(path), "".join(line + "\n" for line in lines), int(m.group(1)))

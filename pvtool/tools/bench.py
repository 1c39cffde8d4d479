"""Benchmarks: the same kernel built native and PV, run bare, trap-and-emulate and PV.

`measure()` runs every (kernel, mode) pair once per repeat, interleaved -- for
each repeat, for each kernel, for each mode -- so machine noise lands on all
modes alike, and checks that every run shut down with the same status and
console output as the kernel's first run.  Each `Row` holds the median wall
time of the run itself (the build is not timed), the exits in total and by
reason, and the ratios that matter: time against bare, and for pv, exits and
time against trap.  `Progress` and `median` are shared with
bench/code_quality.py.
"""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from time import perf_counter
from typing import Callable, TextIO

from runtime.hypervisor import MODES, RunResult, run as run_guest

from .. import driver

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_KERNELS = tuple(ROOT / "kernels" / f"{name}.pvk" for name in ("churn", "critical", "sieve", "tasks"))
TARGET_OF = {"bare": "native", "trap": "native", "pv": "pv", "hvm": "native", "hvm-shadow": "native"}

Runner = Callable[[bytes, str, float | None], RunResult]


class BenchError(Exception):
    """A run that did not end the way the benchmark needs; str() is one line."""


@dataclass
class Kernel:
    name: str
    images: dict[str, bytes]          # by target: 'native', 'pv'


@dataclass
class Sample:
    seconds: float
    result: RunResult


@dataclass
class Row:
    kernel: str
    mode: str
    seconds: float                     # median wall time of the run
    exits: int
    exits_by_reason: dict[str, int]
    status: int
    repeats: int
    guest_seconds: float               # medians of the runtime's own split
    hypervisor_seconds: float
    ratio_to_bare: float | None = None
    exits_vs_trap: float | None = None   # pv only
    time_vs_trap: float | None = None    # pv only
    samples: list[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        doc = asdict(self)
        for key in ("seconds", "guest_seconds", "hypervisor_seconds"):
            doc[key] = round(doc[key], 6)
        for key in ("ratio_to_bare", "exits_vs_trap", "time_vs_trap"):
            if doc[key] is not None:
                doc[key] = round(doc[key], 4)
        doc["samples"] = [round(s, 6) for s in self.samples]
        return doc


def median(values: list[float]) -> float:
    return statistics.median(values)


def ratio(a: float, b: float) -> float | None:
    return a / b if b else None


class Progress:
    """One status line on a terminal, rewritten in place with \\r; silent when piped."""

    def __init__(self, stream: TextIO, total: int):
        self.stream, self.total, self.done, self.width = stream, total, 0, 0
        self.live = bool(getattr(stream, "isatty", lambda: False)())

    def step(self, what: str) -> None:
        self.done += 1
        if not self.live:
            return
        line = f"[{self.done}/{self.total}] {what}"
        self.stream.write("\r" + line.ljust(self.width))
        self.stream.flush()
        self.width = max(self.width, len(line))

    def clear(self) -> None:
        if self.live and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
            self.width = 0


def kernel_names(paths: list[Path]) -> list[str]:
    """Stems, unless two kernels share one; then the paths as given."""
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else str(p) for s, p in zip(stems, paths)]


def build(path: Path, name: str, modes: list[str]) -> Kernel:
    """Compile `path` for each target the modes need (CompileError on bad source)."""
    targets = sorted({TARGET_OF[m] for m in modes})
    return Kernel(name, {t: driver.compile_file(str(path), t) for t in targets})


def measure(kernels: list[Kernel], modes: list[str], repeat: int, timeout: float | None = 60.0,
            runner: Runner | None = None, progress: Progress | None = None) -> list[Row]:
    """Run everything `repeat` times, interleaved; one Row per kernel and mode."""
    runner = runner or _default_runner
    samples: dict[tuple[str, str], list[Sample]] = {(k.name, m): [] for k in kernels for m in modes}
    first: dict[str, tuple[str, RunResult]] = {}
    for r in range(repeat):
        for k in kernels:
            for mode in modes:
                if progress:
                    progress.step(f"repeat {r + 1}/{repeat}: {k.name} {mode}")
                start = perf_counter()
                result = runner(k.images[TARGET_OF[mode]], mode, timeout)
                seconds = perf_counter() - start
                _check(k.name, mode, result, first.setdefault(k.name, (mode, result)))
                samples[k.name, mode].append(Sample(seconds, result))
    if progress:
        progress.clear()
    return [_row(k.name, m, samples) for k in kernels for m in modes]


def _default_runner(image: bytes, mode: str, timeout: float | None) -> RunResult:
    return run_guest(image, mode, timeout)


def _check(kernel: str, mode: str, result: RunResult, reference: tuple[str, RunResult]) -> None:
    if result.reason != "shutdown":
        raise BenchError(f"{kernel} in {mode} mode did not shut down: {result.message or result.reason}")
    ref_mode, ref = reference
    if result.status != ref.status:
        raise BenchError(f"{kernel}: exit status {result.status} in {mode} mode "
                         f"but {ref.status} in {ref_mode} mode")
    if result.console != ref.console:
        raise BenchError(f"{kernel}: console output in {mode} mode differs from {ref_mode} mode "
                         f"({_first_difference(ref.console, result.console)})")


def _first_difference(a: bytes, b: bytes) -> str:
    for i, (x, y) in enumerate(zip(a.splitlines(), b.splitlines())):
        if x != y:
            return f"line {i + 1}: {x.decode(errors='replace')!r} vs {y.decode(errors='replace')!r}"
    return f"{len(a.splitlines())} lines vs {len(b.splitlines())}"


def _row(kernel: str, mode: str, samples: dict[tuple[str, str], list[Sample]]) -> Row:
    runs = samples[kernel, mode]
    last = runs[-1].result
    row = Row(kernel, mode,
              seconds=median([s.seconds for s in runs]),
              exits=last.stats.total_exits,
              exits_by_reason=dict(last.stats.exits.most_common()),
              status=last.status,
              repeats=len(runs),
              guest_seconds=median([s.result.stats.guest_seconds for s in runs]),
              hypervisor_seconds=median([s.result.stats.hypervisor_seconds for s in runs]),
              samples=[s.seconds for s in runs])
    if (kernel, "bare") in samples:
        row.ratio_to_bare = ratio(row.seconds, median([s.seconds for s in samples[kernel, "bare"]]))
    if mode == "pv" and (kernel, "trap") in samples:
        trap = samples[kernel, "trap"]
        row.exits_vs_trap = ratio(row.exits, trap[-1].result.stats.total_exits)
        row.time_vs_trap = ratio(row.seconds, median([s.seconds for s in trap]))
    return row


def parse_modes(text: str) -> list[str]:
    """'pv,bare' -> ['bare', 'pv']: the known modes, in their canonical order."""
    asked = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in asked if m not in MODES]
    if unknown or not asked:
        raise ValueError(f"unknown mode {unknown[0]!r}" if unknown else "no modes given")
    return [m for m in MODES if m in asked]


# -- the report ----------------------------------------------------------------------------

def _fmt(value: float | None, spec: str = ".2f", suffix: str = "x") -> str:
    return "" if value is None else f"{value:{spec}}{suffix}"


def table(rows: list[Row]) -> str:
    """The human-readable report: one line per kernel and mode, then exits by reason."""
    header = ("kernel", "mode", "seconds", "vs bare", "exits", "pv/trap exits", "pv/trap time")
    body = []
    for i, r in enumerate(rows):
        same = i > 0 and rows[i - 1].kernel == r.kernel
        body.append(("" if same else r.kernel, r.mode, f"{r.seconds:.3f}", _fmt(r.ratio_to_bare),
                     str(r.exits), _fmt(r.exits_vs_trap, ".3f"), _fmt(r.time_vs_trap, ".3f")))
    widths = [max(len(line[c]) for line in [header] + body) for c in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(line, widths))).rstrip()
             for line in [header] + body]
    lines += ["", "exits by reason:"]
    for r in rows:
        reasons = ", ".join(f"{why} {n}" for why, n in r.exits_by_reason.items()) or "none"
        lines.append(f"  {r.kernel} {r.mode}: {reasons}")
    return "\n".join(lines)

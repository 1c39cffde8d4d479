"""Benchmarks: the same kernel built native and PV, run in every mode of the runtime (runtime/modes.py).

`measure()` runs every (kernel, mode) pair once per repeat, interleaved -- for
each repeat, for each kernel, for each mode -- so machine noise lands on all
modes alike, and checks that every run shut down with the same status and
console output as the kernel's first run.  Each `Row` holds medians of the
runtime's own times (runtime/stats.py): the run without loading, split into
guest and hypervisor time, and the loading apart (the build is not timed);
the exits in total and by reason; the ratios that matter (run time against
bare, and for pv, exits and run time against trap); the exit overhead a cost
model (costmodel.py) gives those exits on a real CPU, labelled "modelled";
and per phase the kernel marked (runtime/devices/marker.py), figures per
operation, under the names the kernel's header gives its phases
(`// phase N: what`).  `table` is the report, `markdown` the per-operation
tables with only the figures that are the same on every run.  `Progress` and
`median` are shared with bench/code_quality.py.
"""
from __future__ import annotations

import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, TextIO

from runtime.hypervisor import MODES, RunResult, run as run_guest

from .. import driver
from .costmodel import Model

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_KERNELS = tuple(ROOT / "kernels" / f"{name}.pvk" for name in ("churn", "critical", "sieve", "tasks"))
TARGET_OF = {name: mode.image_mode for name, mode in MODES.items()}      # the build each mode runs

Runner = Callable[[bytes, str, float | None], RunResult]
PHASE_NAME = re.compile(r"^// phase (\d+): (.+)$", re.M)


class BenchError(Exception):
    """A run that did not end the way the benchmark needs; str() is one line."""


@dataclass
class Kernel:
    name: str
    images: dict[str, bytes]          # by target: 'native', 'pv'
    phase_names: dict[int, str] = field(default_factory=dict)


@dataclass
class PhaseRow:
    """One marked phase of one kernel in one mode; `per` operations (or runs, if it declared none)."""
    phase: int
    runs: int
    operations: int
    exits: int
    exits_by_reason: dict[str, int]
    virtual_ns: int
    host_seconds: float                # median over the repeats
    modelled_ns: float | None = None   # the model's cost of the phase's exits
    name: str = ""                     # from the kernel's header, if it names the phase

    @property
    def per(self) -> int:
        return self.operations or self.runs

    @property
    def unit(self) -> str:
        return "op" if self.operations else "run"

    def per_op(self) -> dict:
        """The figures per operation (per run if the kernel declared no operations)."""
        n = self.per
        return {"exits_per_op": self.exits / n,
                "exits_by_reason_per_op": {why: k / n for why, k in self.exits_by_reason.items()},
                "virtual_ns_per_op": self.virtual_ns / n,
                "host_us_per_op": self.host_seconds / n * 1e6,
                "modelled_ns_per_op": _divided(self.modelled_ns, n)}

    def as_dict(self) -> dict:
        doc = asdict(self) | {"host_seconds": round(self.host_seconds, 6), "per": self.unit}
        for key, value in self.per_op().items():
            doc[key] = ({why: round(k, 4) for why, k in value.items()} if isinstance(value, dict)
                        else None if value is None else round(value, 4))
        return doc


@dataclass
class Row:
    kernel: str
    mode: str
    run_seconds: float                 # medians over the repeats: the run without loading ...
    guest_seconds: float               # ... of which guest code
    hypervisor_seconds: float          # ... and exit handling
    load_seconds: float                # reading, validating and loading the image
    wall_seconds: float                # all of it
    exits: int
    exits_by_reason: dict[str, int]
    multicall_entries: dict[str, int]
    status: int
    repeats: int
    ratio_to_bare: float | None = None   # run time against bare's
    exits_vs_trap: float | None = None   # pv only
    time_vs_trap: float | None = None    # pv only: run time against trap's
    cost_model: str | None = None
    modelled_ns: float | None = None     # the model's exit overhead for one run
    phases: list[PhaseRow] = field(default_factory=list)
    samples: list[float] = field(default_factory=list)   # run seconds of each repeat

    def as_dict(self) -> dict:
        doc = asdict(self)
        for key in ("run_seconds", "guest_seconds", "hypervisor_seconds", "load_seconds", "wall_seconds"):
            doc[key] = round(doc[key], 6)
        for key in ("ratio_to_bare", "exits_vs_trap", "time_vs_trap"):
            if doc[key] is not None:
                doc[key] = round(doc[key], 4)
        if self.modelled_ns is not None:
            doc["modelled_ns"] = round(self.modelled_ns, 1)
        doc["phases"] = [p.as_dict() for p in self.phases]
        doc["samples"] = [round(s, 6) for s in self.samples]
        return doc


def _divided(value: float | None, n: float) -> float | None:
    return None if value is None else value / n


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


def phase_names(source: str) -> dict[int, str]:
    """The names a kernel's header gives its phases: `// phase N: what`."""
    return {int(n): name.strip() for n, name in PHASE_NAME.findall(source)}


def build(path: Path, name: str, modes: list[str]) -> Kernel:
    """Compile `path` for each target the modes need (CompileError on bad source)."""
    targets = sorted({TARGET_OF[m] for m in modes})
    return Kernel(name, {t: driver.compile_file(str(path), t) for t in targets}, phase_names(path.read_text()))


def measure(kernels: list[Kernel], modes: list[str], repeat: int, timeout: float | None = 60.0,
            runner: Runner | None = None, progress: Progress | None = None,
            model: Model | None = None) -> list[Row]:
    """Run everything `repeat` times, interleaved; one Row per kernel and mode, priced by `model`."""
    runner = runner or _default_runner
    results: dict[tuple[str, str], list[RunResult]] = {(k.name, m): [] for k in kernels for m in modes}
    first: dict[str, tuple[str, RunResult]] = {}
    for r in range(repeat):
        for k in kernels:
            for mode in modes:
                if progress:
                    progress.step(f"repeat {r + 1}/{repeat}: {k.name} {mode}")
                result = runner(k.images[TARGET_OF[mode]], mode, timeout)
                _check(k.name, mode, result, first.setdefault(k.name, (mode, result)))
                results[k.name, mode].append(result)
    if progress:
        progress.clear()
    return [_row(k.name, m, results, model, k.phase_names) for k in kernels for m in modes]


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


def _run_seconds(result: RunResult) -> float:
    """The run without loading, by the runtime's own clock."""
    return max(0.0, result.stats.wall_seconds - result.stats.load_seconds)


def _median_of(runs: list[RunResult], what: Callable[[RunResult], float]) -> float:
    return median([what(r) for r in runs])


def _row(kernel: str, mode: str, results: dict[tuple[str, str], list[RunResult]], model: Model | None,
         names: dict[int, str]) -> Row:
    runs = results[kernel, mode]
    stats = runs[-1].stats                  # exits are deterministic: the last run's stand for all
    row = Row(kernel, mode,
              run_seconds=_median_of(runs, _run_seconds),
              guest_seconds=_median_of(runs, lambda r: r.stats.guest_seconds),
              hypervisor_seconds=_median_of(runs, lambda r: r.stats.hypervisor_seconds),
              load_seconds=_median_of(runs, lambda r: r.stats.load_seconds),
              wall_seconds=_median_of(runs, lambda r: r.stats.wall_seconds),
              exits=stats.total_exits,
              exits_by_reason=dict(stats.exits.most_common()),
              multicall_entries=dict(stats.batched.most_common()),
              status=runs[-1].status,
              repeats=len(runs),
              phases=_phases(mode, runs, model, names),
              samples=[_run_seconds(r) for r in runs])
    if model is not None:
        row.cost_model = model.name
        row.modelled_ns = model.overhead_ns(mode, stats.exits, stats.batched)
    if (kernel, "bare") in results:
        row.ratio_to_bare = ratio(row.run_seconds, _median_of(results[kernel, "bare"], _run_seconds))
    if mode == "pv" and (kernel, "trap") in results:
        trap = results[kernel, "trap"]
        row.exits_vs_trap = ratio(row.exits, trap[-1].stats.total_exits)
        row.time_vs_trap = ratio(row.run_seconds, _median_of(trap, _run_seconds))
    return row


def _phases(mode: str, runs: list[RunResult], model: Model | None, names: dict[int, str]) -> list[PhaseRow]:
    """The marked phases (runtime/devices/marker.py): counts from the last run, host time the median."""
    rows = []
    for phase_id, phase in sorted(runs[-1].stats.phases.items()):
        exits = dict(phase.exits.most_common())
        host = median([r.stats.phases[phase_id].host_seconds for r in runs if phase_id in r.stats.phases])
        rows.append(PhaseRow(phase_id, phase.runs, phase.operations, phase.total_exits, exits,
                             phase.virtual_ns, host,
                             None if model is None else model.overhead_ns(mode, exits), names.get(phase_id, "")))
    return rows


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


def _columns(header: tuple[str, ...], body: list[tuple[str, ...]], text: set[int]) -> list[str]:
    """Aligned lines: the `text` columns to the left, the others (figures) to the right."""
    widths = [max(len(line[c]) for line in [header] + body) for c in range(len(header))]
    return ["  ".join(cell.ljust(w) if c in text else cell.rjust(w)
                      for c, (cell, w) in enumerate(zip(line, widths))).rstrip()
            for line in [header] + body]


def table(rows: list[Row], model: Model | None = None) -> str:
    """The human-readable report: one line per kernel and mode, exits by reason, then the phases."""
    header = ("kernel", "mode", "run s", "guest s", "hyp s", "load s", "vs bare", "exits",
              "pv/trap exits", "pv/trap time") + (("modelled ms",) if model else ())
    body = []
    for i, r in enumerate(rows):
        same = i > 0 and rows[i - 1].kernel == r.kernel
        body.append(("" if same else r.kernel, r.mode, f"{r.run_seconds:.3f}", f"{r.guest_seconds:.3f}",
                     f"{r.hypervisor_seconds:.3f}", f"{r.load_seconds:.3f}", _fmt(r.ratio_to_bare),
                     str(r.exits), _fmt(r.exits_vs_trap, ".3f"), _fmt(r.time_vs_trap, ".3f"))
                    + ((_fmt(_divided(r.modelled_ns, 1e6), ".3f", ""),) if model else ()))
    lines = _columns(header, body, {0, 1})
    lines += ["", "run s = guest s + hyp s (+ the run loop); load s apart; vs bare and pv/trap time compare run s."]
    if model:
        lines.append(f"modelled ms: the exits' overhead on a real CPU, cost model {model.describe()} "
                     f"(docs/bench.md cites the figures).")
    lines += ["", "exits by reason:"]
    for r in rows:
        reasons = ", ".join(f"{why} {n}" for why, n in r.exits_by_reason.items()) or "none"
        lines.append(f"  {r.kernel} {r.mode}: {reasons}")
    if any(r.phases for r in rows):
        lines += ["", *phase_table(rows, model)]
    return "\n".join(lines)


def phase_table(rows: list[Row], model: Model | None) -> list[str]:
    """Per operation, for every phase the kernels marked: exits, virtual and host time, modelled cost;
    the phase's name (if the kernel gives one) on its first line."""
    pairs = _by_phase(rows)
    named = any(p.name for _, p in pairs)
    header = ("kernel", "phase") + (("name",) if named else ()) + ("mode", "per", "count", "exits",
                                                                   "virtual ns", "host us") + \
        (("modelled ns",) if model else ()) + ("exits by reason",)
    body = []
    for i, (r, p) in enumerate(pairs):
        op = p.per_op()
        reasons = ", ".join(f"{why} {k:.3g}" for why, k in op["exits_by_reason_per_op"].items()) or "none"
        first = i == 0 or (pairs[i - 1][0].kernel, pairs[i - 1][1].phase) != (r.kernel, p.phase)
        body.append((r.kernel, str(p.phase)) + ((p.name if first else "",) if named else ()) +
                    (r.mode, p.unit, str(p.per), f"{op['exits_per_op']:.3f}",
                     f"{op['virtual_ns_per_op']:.1f}", f"{op['host_us_per_op']:.3f}")
                    + ((_fmt(op["modelled_ns_per_op"], ".1f", ""),) if model else ()) + (reasons,))
    text = {0, 2, 3, 4} if named else {0, 2, 3}
    lines = _columns(header, body, text | {len(header) - 1})
    return ["per operation, by marked phase (port 0x80; count = operations, or runs if none declared):"] + lines


SMALL = 0.005          # a reason below this per operation is left out of markdown's breakdown


def markdown(rows: list[Row], model: Model | None) -> str:
    """The per-operation figures as Markdown: a summary (exits per operation, a row per phase, a column
    per mode), then one table per kernel and phase, a row per mode: exits per operation, by reason,
    and their modelled cost.  Only figures that are the same on every run (no times), so the tables
    can be regenerated into documentation unchanged."""
    pairs = _by_phase(rows)
    out = _markdown_summary(pairs) if pairs else []
    for kernel in dict.fromkeys(r.kernel for r in rows):
        phases = list(dict.fromkeys(p.phase for r, p in pairs if r.kernel == kernel))
        if not phases:
            out += [f"*{kernel} marks no phases.*", ""]
        for phase in phases:
            group = [(r, p) for r, p in pairs if r.kernel == kernel and p.phase == phase]
            out += [_markdown_title(kernel, group[0][1]), "",
                    "| mode | exits per op | by reason, per op |" + (" modelled ns per op |" if model else ""),
                    "|---|---:|---|" + ("---:|" if model else "")]
            for r, p in group:
                op = p.per_op()
                cells = [r.mode, f"{op['exits_per_op']:.3f}", _reasons(op["exits_by_reason_per_op"])]
                if model:
                    cells.append(_fmt(op["modelled_ns_per_op"], ".0f", ""))
                out.append("| " + " | ".join(cells) + " |")
            out.append("")
    if model and pairs:
        out.append(f"Modelled: cost model {model.describe()}.")
    return "\n".join(out).rstrip() + "\n"


def _markdown_summary(pairs: list[tuple[Row, PhaseRow]]) -> list[str]:
    modes = list(dict.fromkeys(r.mode for r, _ in pairs))
    phases = list(dict.fromkeys((r.kernel, p.phase) for r, p in pairs))
    cells = {(r.kernel, p.phase, r.mode): f"{p.per_op()['exits_per_op']:.2f}" for r, p in pairs}
    names = {(r.kernel, p.phase): p.name for r, p in pairs}
    out = ["| exits per operation | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    for kernel, phase in phases:
        label = f"{kernel} {phase}" + (f": {names[kernel, phase]}" if names[kernel, phase] else "")
        out.append(f"| {label} | " + " | ".join(cells.get((kernel, phase, m), "") for m in modes) + " |")
    return out + [""]


def _markdown_title(kernel: str, p: PhaseRow) -> str:
    what = f": {p.name}" if p.name else ""
    return f"**{kernel}, phase {p.phase}{what}** ({p.per} {'operations' if p.unit == 'op' else 'runs'})"


def _reasons(per_op: dict[str, float]) -> str:
    """'syscall 1, trap iretq 1': each reason's exits per operation, the smallest left out."""
    kept = sorted(((k, why) for why, k in per_op.items() if k >= SMALL), key=lambda kw: (-kw[0], kw[1]))
    return ", ".join(f"{why} {f'{k:.2f}'.rstrip('0').rstrip('.')}" for k, why in kept)


def _by_phase(rows: list[Row]) -> list[tuple[Row, PhaseRow]]:
    """Each kernel's phases in order, and within a phase the modes side by side."""
    kernels, modes = list(dict.fromkeys(r.kernel for r in rows)), list(MODES)
    pairs = [(r, p) for r in rows for p in r.phases]
    return sorted(pairs, key=lambda rp: (kernels.index(rp[0].kernel), rp[1].phase, modes.index(rp[0].mode)))

"""The cost model: what this runtime's exits would cost on a real CPU.

This runtime's exits cost Python time, so wall-clock ratios make exits look
far more expensive than they are.  A cost model prices every exit by its
kind with a figure measured on real hardware:

    modelled overhead = sum over exit kinds of (exits of that kind x that kind's cost)

The figures live in a data file (bench/costs.toml: one model per CPU
generation, every figure with its source); `REASON_KINDS` is the one table
from this runtime's exit reasons (runtime/stats.py, runtime/exits/) to the
model's kinds.
"""
from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

DEFAULT_FILE = Path(__file__).resolve().parents[2] / "bench" / "costs.toml"

# The kinds a model can price.  `exit` is any VM exit with its entry back; the
# others cost an exit unless the model says otherwise, except a multicall's
# entries and bare mode's device accesses, which are no exits (0).
KINDS = ("exit", "hypercall", "trapped instruction", "page-table write", "interrupt", "upcall",
         "interrupt window", "exception", "system call", "batched entry", "native")
HVM = ("hvm", "hvm-shadow")

# (modes, or None for any; exit reason or its prefix; kind): the first match wins.
REASON_KINDS: tuple[tuple[tuple[str, ...] | None, str, str], ...] = (
    (("bare",), "", "native"),                 # bare is the machine itself: its exits are device models
    (None, "hypercall ", "hypercall"),         # pv: `hypercall set_pte`, `hypercall multicall`, ...
    (None, "upcall ", "upcall"),               # pv: an interrupt delivered as an event upcall
    (None, "interrupt window", "interrupt window"),   # trap, hvm: the guest can take an interrupt again
    (None, "interrupt ", "interrupt"),         # trap: an external interrupt, exit and injection
    (HVM, "external interrupt ", "interrupt"),        # hvm: the same, by VT-x's name
    (None, "page-table write", "page-table write"),   # trap, hvm-shadow: a store into a live table
    (None, "write beside a page table", "page-table write"),  # a store into a protected granule
    (None, "table page released", "page-table write"),        # a store into a table no longer live
    (None, "exception ", "exception"),         # an exception the hypervisor sees first (#PF under shadow paging)
    (None, "system call", "system call"),      # a user process's syscall: trapped (trap) or bounced (pv)
    (None, "trap ", "trapped instruction"),    # trap: `trap cli`, `trap mov to cr3`, ...
    (HVM, "", "trapped instruction"),          # hvm: VT-x's instruction exits (I/O instruction, CPUID, HLT,
                                               # CR3 load, INVLPG ...)
)
BATCHED = "batched entry"          # a multicall entry: no exit of its own (Stats.batched)
BASES = ("published", "estimate", "not modelled")


class CostModelError(Exception):
    """A cost file that cannot be used; str() is one line naming the file."""


@dataclass(frozen=True)
class Cost:
    cycles: float
    basis: str                # one of BASES
    source: str = ""          # a key of the file's [sources]
    derived: str = ""         # how an estimate was computed


@dataclass(frozen=True)
class Model:
    name: str
    cpu: str
    ghz: float
    exit: Cost
    kinds: Mapping[str, Cost]

    def cost(self, kind: str) -> Cost:
        """A kind the model does not price costs an exit, except what is not an exit at all."""
        if kind in self.kinds:
            return self.kinds[kind]
        return Cost(0, "not modelled") if kind in ("native", BATCHED) else self.exit

    def ns(self, kind: str) -> float:
        return self.cost(kind).cycles / self.ghz

    def overhead_ns(self, mode: str, exits_by_reason: Mapping[str, int],
                    batched: Mapping[str, int] | None = None) -> float:
        """The modelled cost of these exits (and multicall entries) in `mode`, in nanoseconds."""
        total = sum(n * self.ns(kind_of(mode, reason)) for reason, n in exits_by_reason.items())
        if batched:
            total += sum(batched.values()) * self.ns(BATCHED)
        return total

    def describe(self) -> str:
        basis = self.exit.basis + (f", {self.exit.source}" if self.exit.source else "")
        return f"{self.name}: {self.cpu}; an exit {self.exit.cycles:,.0f} cycles ({basis})"


@dataclass(frozen=True)
class CostTable:
    path: Path
    default: str
    models: Mapping[str, Model]
    sources: Mapping[str, Mapping[str, str]]

    def choose(self, name: str | None) -> Model:
        name = name or self.default
        if name not in self.models:
            raise CostModelError(f"{self.path}: no cost model {name!r} (models: {', '.join(self.models)})")
        return self.models[name]


def kind_of(mode: str, reason: str) -> str:
    """The model's kind of one exit reason; `exit` for a reason the table does not name."""
    for modes, prefix, kind in REASON_KINDS:
        if (modes is None or mode in modes) and reason.startswith(prefix):
            return kind
    return "exit"


# -- reading a cost file ------------------------------------------------------------------

def load(path: Path | None = None) -> CostTable:
    """Read a cost file (TOML, or JSON if it ends in .json) and check every figure."""
    path = Path(path or DEFAULT_FILE)
    doc = _read(path)
    sources = doc.get("sources", {})
    if not isinstance(sources, dict) or not all(isinstance(s, dict) for s in sources.values()):
        raise CostModelError(f"{path}: [sources] must be a table of tables")
    models = doc.get("models")
    if not isinstance(models, dict) or not models:
        raise CostModelError(f"{path}: no [models.NAME] table")
    table = {name: _model(path, name, spec, sources) for name, spec in models.items()}
    default = doc.get("default", next(iter(table)))
    if default not in table:
        raise CostModelError(f"{path}: default model {default!r} is not defined")
    return CostTable(path, default, table, sources)


def _read(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise CostModelError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        return json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (tomllib.TOMLDecodeError, json.JSONDecodeError) as e:
        raise CostModelError(f"{path}: not valid {'JSON' if path.suffix == '.json' else 'TOML'}: {e}") from None


def _model(path: Path, name: str, spec, sources: Mapping) -> Model:
    where = f"{path}: model {name!r}"
    if not isinstance(spec, dict):
        raise CostModelError(f"{where}: must be a table")
    ghz = spec.get("ghz")
    if not _number(ghz) or ghz <= 0:
        raise CostModelError(f"{where}: ghz must be a positive number (the clock that turns cycles into time)")
    kinds = spec.get("kinds", {})
    if not isinstance(kinds, dict):
        raise CostModelError(f"{where}: kinds must be a table")
    unknown = [k for k in kinds if k not in KINDS or k in ("exit", "native")]
    if unknown:
        raise CostModelError(f"{where}: unknown exit kind {unknown[0]!r} "
                             f"(kinds: {', '.join(k for k in KINDS if k not in ('exit', 'native'))})")
    if "exit" not in spec:
        raise CostModelError(f"{where}: no exit cost (the cost of one VM exit and entry)")
    return Model(name, str(spec.get("cpu", name)), float(ghz), _cost(where, "exit", spec["exit"], sources),
                 {k: _cost(where, k, v, sources) for k, v in kinds.items()})


def _cost(where: str, kind: str, spec, sources: Mapping) -> Cost:
    if not isinstance(spec, dict):
        raise CostModelError(f"{where}: {kind} must be a table like {{ cycles = 2000, basis = \"published\" }}")
    cycles, basis, source = spec.get("cycles"), spec.get("basis"), spec.get("source", "")
    if not _number(cycles) or cycles < 0:
        raise CostModelError(f"{where}: {kind}: cycles must be a number, at least 0")
    if basis not in BASES:
        raise CostModelError(f"{where}: {kind}: basis must be one of {', '.join(BASES)}")
    if basis != "not modelled" and source not in sources:
        raise CostModelError(f"{where}: {kind}: a {basis} figure needs a source from [sources]"
                             + (f" (no source {source!r})" if source else ""))
    if basis == "estimate" and not spec.get("derived"):
        raise CostModelError(f"{where}: {kind}: an estimate must say how it was derived (derived = ...)")
    return Cost(float(cycles), basis, source, str(spec.get("derived", "")))


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)

"""Register allocation: liveness by dataflow, then linear scan.

Each vreg gets one live interval, the hull of every program point where
it is live (vregs are not SSA, so holes are ignored).  Points are numbered
in block order: 0 is the function entry (where parameters arrive), then
each block has a point for its entry followed by one per instruction and
one for its terminator.  A register is *clobbered* at an instruction's
point (calls, division, variable shifts, fixed-register machine ops); an
interval may take that register only if the clobber is not strictly
inside it -- at its own end the value is read first, at its start it is
written afterwards.  Two intervals may share a register when one ends at
the point where the other starts; the emitters read all operands before
writing the result.

When no register fits, the interval (active or current) that ends last
is spilled to an 8-byte frame slot for its whole life (Poletto & Sarkar);
spill slots are reused once their interval has ended.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable, Iterable

from .. import ir
from .encode import Reg


@dataclass
class Interval:
    vreg: ir.VReg
    start: int
    end: int
    reg: Reg | None = None
    spill: int | None = None


@dataclass
class Allocation:
    home: dict[ir.VReg, Reg | int] = field(default_factory=dict)  # a Reg or a spill slot index
    spill_slots: int = 0
    used: set[Reg] = field(default_factory=set)                   # registers given to some vreg
    intervals: list[Interval] = field(default_factory=list)


def liveness(blocks) -> tuple[dict[str, set], dict[str, set]]:
    """Live-in and live-out vreg sets per block label (backward dataflow)."""
    gen, kill = {}, {}
    for b in blocks:
        g, k = set(), set()
        for ins in [*b.instrs, b.term]:
            g |= {u for u in ins.uses() if isinstance(u, ir.VReg) and u not in k}
            k |= set(ins.defs())
        gen[b.label], kill[b.label] = g, k
    live_in = {b.label: set() for b in blocks}
    live_out = {b.label: set() for b in blocks}
    changed = True
    while changed:
        changed = False
        for b in reversed(blocks):
            out = set().union(*(live_in[s] for s in b.successors()))
            inn = gen[b.label] | (out - kill[b.label])
            if out != live_out[b.label] or inn != live_in[b.label]:
                live_out[b.label], live_in[b.label] = out, inn
                changed = True
    return live_in, live_out


def build_intervals(blocks, params: list[ir.VReg]) -> tuple[dict[ir.VReg, Interval], list[tuple[int, ir.Instr]]]:
    """Live intervals, and every instruction with its program point."""
    live_in, live_out = liveness(blocks)
    ivs: dict[ir.VReg, Interval] = {}

    def extend(v: ir.VReg, p: int) -> None:
        iv = ivs.get(v)
        if iv is None:
            ivs[v] = Interval(v, p, p)
        else:
            iv.start, iv.end = min(iv.start, p), max(iv.end, p)

    for v in params:
        extend(v, 0)
    points = []
    p = 0
    for b in blocks:
        p += 1
        for v in live_in[b.label]:
            extend(v, p)
        for ins in [*b.instrs, b.term]:
            p += 1
            points.append((p, ins))
            for v in [*ins.uses(), *ins.defs()]:
                if isinstance(v, ir.VReg):
                    extend(v, p)
        for v in live_out[b.label]:
            extend(v, p)
    return ivs, points


def allocate(blocks, params: list[ir.VReg], registers: list[Reg],
             clobbers: Callable[[ir.Instr], Iterable[Reg]],
             hints: dict[ir.VReg, list[Reg | ir.VReg]] | None = None) -> Allocation:
    """Linear scan over `registers` (in order of preference)."""
    ivs, points = build_intervals(blocks, params)
    clobbered: dict[Reg, list[int]] = {r: [] for r in registers}
    for p, ins in points:
        for r in clobbers(ins):
            if r in clobbered:
                clobbered[r].append(p)
    hints = hints or {}
    alloc = Allocation(intervals=sorted(ivs.values(), key=lambda i: (i.start, i.vreg.id)))

    def fits(iv: Interval, r: Reg) -> bool:
        ps = clobbered[r]
        k = bisect_right(ps, iv.start)
        return k == len(ps) or ps[k] >= iv.end

    def preferred(iv: Interval, free: list[Reg]) -> Reg:
        for h in hints.get(iv.vreg, ()):
            r = h if isinstance(h, Reg) else alloc.home.get(h)
            if isinstance(r, Reg) and r in free:
                return r
        return free[0]

    active: list[Interval] = []          # intervals holding a register
    spilled: list[Interval] = []         # spilled intervals still live
    free_slots: dict[int, int] = {}      # slot -> end of its last owner

    def spill(iv: Interval) -> None:
        # an evicted interval started earlier: only reuse slots free since then
        slot = next((s for s, end in free_slots.items() if end < iv.start), None)
        if slot is None:
            slot = _new_slot(alloc)
        else:
            del free_slots[slot]
        iv.reg, iv.spill = None, slot
        alloc.home[iv.vreg] = slot
        spilled.append(iv)

    for iv in alloc.intervals:
        for a in [a for a in active if a.end <= iv.start]:
            active.remove(a)
        for s in [s for s in spilled if s.end < iv.start]:
            spilled.remove(s)
            free_slots[s.spill] = s.end
        taken = {a.reg for a in active}
        free = [r for r in registers if r not in taken and fits(iv, r)]
        if free:
            iv.reg = preferred(iv, free)
        else:
            victims = [a for a in active if fits(iv, a.reg)]
            victim = max(victims, key=lambda a: a.end, default=None)
            if victim is None or victim.end <= iv.end:
                spill(iv)
                continue
            active.remove(victim)
            iv.reg = victim.reg
            spill(victim)
        active.append(iv)
        alloc.home[iv.vreg] = iv.reg
        alloc.used.add(iv.reg)
    return alloc


def _new_slot(alloc: Allocation) -> int:
    alloc.spill_slots += 1
    return alloc.spill_slots - 1

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

Vregs are handled by number (`VReg.id`) throughout, and live sets are
Python ints used as bit sets: this pass runs once per function and is the
back end's busiest.
"""
from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

from .. import ir
from .encode import Reg


@dataclass
class Allocation:
    home: dict[int, Reg | int] = field(default_factory=dict)   # VReg.id -> a Reg or a spill slot index
    spill_slots: int = 0
    used: set[Reg] = field(default_factory=set)                # registers given to some vreg
    clobbered: set[Reg] = field(default_factory=set)           # registers some instruction destroys
    # Each vreg's live interval, by VReg.id: its first and its last program point.
    start: dict[int, int] = field(default_factory=dict)
    end: dict[int, int] = field(default_factory=dict)


# By kind of instruction, the registers an instruction of that kind destroys
# (kinds not in the table destroy none).
Clobbers = dict[type, Callable[[ir.Instr], Iterable[Reg]]]


def bits(x: int) -> Iterator[int]:
    """The members of a bit set."""
    while x:
        low = x & -x
        yield low.bit_length() - 1
        x ^= low


def build_intervals(blocks, params: list[ir.VReg], clobbers: Clobbers
                    ) -> tuple[dict[int, int], dict[int, int], list[tuple[int, Iterable[Reg]]]]:
    """Live intervals -- the first and the last program point of each vreg, by
    VReg.id -- and the program points where registers are clobbered.

    One walk over the instructions finds each block's upward-exposed uses
    and definitions, the first and last point where each vreg is read or
    written, and the clobber points; the dataflow then adds the points
    where a vreg is live into or out of a block.  An interval is the hull
    of all those points, so the order they are met in does not matter."""
    VReg, operands = ir.VReg, ir.operands
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for v in params:
        first[v.id] = last[v.id] = 0
    gen, kill, succs, bounds = {}, {}, [], []
    clobber_points = []
    p = 0
    for b in blocks:
        p += 1
        entry = p
        g = k = 0
        for ins in (*b.instrs, b.term):
            p += 1
            uses, d = operands(ins)
            for u in uses:
                if type(u) is VReg:
                    u = u.id
                    if not k >> u & 1:
                        g |= 1 << u
                    if u not in first:
                        first[u] = p
                    last[u] = p
            if type(d) is VReg:
                d = d.id
                k |= 1 << d
                if d not in first:
                    first[d] = p
                last[d] = p
            of = clobbers.get(type(ins))
            if of is not None:
                lost = of(ins)
                if lost:
                    clobber_points.append((p, lost))
        label = b.label
        gen[label], kill[label] = g, k
        succs.append((label, b.successors()))
        bounds.append((label, entry, p))
    live_in, live_out = _liveness(gen, kill, succs)
    # Only the first block a vreg is live into and the last it is live out of
    # can widen its hull (a vreg live into a block is read there or live out
    # of it, so that entry never moves its end).
    seen = 0
    for label, entry, _ in bounds:
        new = live_in[label] & ~seen
        if new:
            for v in bits(new):
                if entry < first[v]:
                    first[v] = entry
            seen |= new
    seen = 0
    for label, _, exit_ in reversed(bounds):
        new = live_out[label] & ~seen
        if new:
            for v in bits(new):                 # read or written somewhere: seen by the walk
                if exit_ > last[v]:
                    last[v] = exit_
            seen |= new
    return first, last, clobber_points


def _liveness(gen: dict[str, int], kill: dict[str, int], succs: list[tuple[str, list[str]]]
              ) -> tuple[dict[str, int], dict[str, int]]:
    """Live-in and live-out bit sets per block label: backward dataflow to a
    fixed point, visiting the blocks last first.  Live-in starts as gen, which
    it always holds, so it changes only when live-out does."""
    live_in = dict(gen)
    live_out = dict.fromkeys(gen, 0)
    succs = succs[::-1]
    changed = True
    while changed:
        changed = False
        for label, following in succs:
            out = 0
            for s in following:
                out |= live_in[s]
            if out != live_out[label]:
                live_out[label] = out
                live_in[label] = gen[label] | (out & ~kill[label])
                changed = True
    return live_in, live_out


def allocate(blocks, params: list[ir.VReg], registers: list[Reg],
             clobbers: Clobbers,
             hints: dict[int, list[Reg | int]] | None = None) -> Allocation:
    """Linear scan over `registers` (in order of preference); `hints` maps a vreg
    number to preferred registers or to vreg numbers whose register it would share.
    Intervals are handled as vreg numbers, their bounds looked up in `first` and
    `last`: no object per interval."""
    first, last, clobber_points = build_intervals(blocks, params, clobbers)
    alloc = Allocation(start=first, end=last)
    clobbered: dict[Reg, list[int]] = {r: [] for r in registers}
    for p, lost in clobber_points:
        alloc.clobbered |= lost
        for r in lost:
            if r in clobbered:
                clobbered[r].append(p)
    hints = hints or {}
    home = alloc.home

    def fits(start: int, end: int, r: Reg) -> bool:
        ps = clobbered[r]
        if not ps:
            return True
        k = bisect_right(ps, start)
        return k == len(ps) or ps[k] >= end

    def hinted(v: int, start: int, end: int) -> Reg | None:
        for h in hints[v]:
            r = h if type(h) is Reg else home.get(h)
            if r in until and until[r] <= start and fits(start, end, r):
                return r
        return None

    def victim(start: int, end: int) -> Reg | None:
        """The register of the interval to spill for one of [start, end], if that
        ends later (else the new one is spilled): the active one that ends last."""
        r = max((r for r in active if last[active[r]] > start and fits(start, end, r)),
                key=lambda r: last[active[r]], default=None)
        return r if r is not None and last[active[r]] > end else None

    # register -> the vreg last given it, which holds it until its interval ends
    # (an ended one is left here: a register is free once its holder's end is behind)
    active: dict[Reg, int] = {}
    until = dict.fromkeys(registers, -1)     # register -> the end of its holder (-1: none yet)
    spilled: list[int] = []              # spilled vregs still live
    free_slots: dict[int, int] = {}      # slot -> end of its last owner

    def spill(v: int) -> None:
        # an evicted interval started earlier: only reuse slots free since then
        slot = next((s for s, end in free_slots.items() if end < first[v]), None)
        if slot is None:
            slot = alloc.spill_slots
            alloc.spill_slots += 1
        else:
            del free_slots[slot]
        home[v] = slot
        spilled.append(v)

    for s, v in sorted(zip(first.values(), first)):     # by start, then vreg
        e = last[v]
        if spilled:
            for old in [x for x in spilled if last[x] < s]:
                spilled.remove(old)
                free_slots[home[old]] = last[old]
        r = hinted(v, s, e) if v in hints else None
        if r is None:
            for r in registers:         # the first one free, and not destroyed inside [s, e]
                if until[r] <= s and (not clobbered[r] or fits(s, e, r)):
                    break
            else:
                r = victim(s, e)
                if r is None:
                    spill(v)
                    continue
                spill(active[r])
        # moved to the end: the order the holders got their registers decides between
        # equally long victims
        active.pop(r, None)
        active[r] = v
        until[r] = e
        home[v] = r
    alloc.used = set(active)            # (a register once given stays in `active`)
    return alloc

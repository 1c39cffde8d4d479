"""Exit counters and times for `pvtool run --stats/--json` and the benchmarks.

An *exit* is one trip from guest code into the hypervisor: a hypercall, a
trapped instruction, a trapped page-table write, a port access or cpuid
caught by an instruction hook.  Entries run inside a multicall are counted
apart (`batched`): they cost no exit of their own.  Interrupts delivered to
the guest count as exits too, by vector ("interrupt 32" in bare and trap,
"upcall 32" in pv): on real hardware each is an exit and an injection.

Also counted: idle skips (a `hlt` or `block` that jumped the virtual clock
to the next timer deadline) and the virtual time they skipped, upcalls
deferred because the guest was inside a batched site, and instruction-count
slices that ran out (clock.py).

Times: `wall` is the whole run including set-up; `load` is the set-up
(reading, validating and loading the image); `run` is the time inside
Unicorn's emulation loop; `hypervisor` the part of that spent in exit
handlers; guest time is the difference.

With `profile` on, exits are also counted by where the guest was (`sites`:
reason -> guest address -> count), for `pvtool run --profile`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


class Tally(Counter):
    """A Counter whose `tally[k] += 1` costs what a dict's does.  Counter's own `__delitem__`, a
    Python method, sends every item assignment through Python-level dispatch: about 100 ns more,
    measured, on a count made at every exit.  (Deleting a missing key raises, as for a dict.)"""
    __setitem__ = dict.__setitem__
    __delitem__ = dict.__delitem__


@dataclass
class Stats:
    mode: str
    exits: Counter = field(default_factory=Tally)
    batched: Counter = field(default_factory=Tally)
    events: Counter = field(default_factory=Tally)     # what the runtime did as the CPU, with no exit
    total_exits: int = 0
    wall_seconds: float = 0.0
    run_seconds: float = 0.0
    hypervisor_seconds: float = 0.0
    tsc: int = 0
    idle_skips: int = 0
    idle_ns: int = 0
    deferred: int = 0
    slices: int = 0
    load_seconds: float = 0.0
    profile: bool = False
    sites: dict[str, Counter] = field(default_factory=dict)
    phases: dict = field(default_factory=dict)         # devices/marker.py: phase id -> Phase
    current_reason: str = ""                           # the exit being handled

    def account(self, reason: str, where: int | None = None) -> None:
        """One exit (or delivery) of this kind, at guest address `where` if known."""
        self.current_reason = reason
        self.exits[reason] += 1
        self.total_exits += 1
        if self.profile and where is not None:
            self.sites.setdefault(reason, Counter())[where] += 1

    @property
    def guest_seconds(self) -> float:
        return max(0.0, self.run_seconds - self.hypervisor_seconds)

    def as_dict(self) -> dict:
        return {
            "mode": self.mode,
            "exits": self.total_exits,
            "exits_by_reason": dict(self.exits.most_common()),
            "multicall_entries": dict(self.batched.most_common()),
            "cpu_events": dict(self.events.most_common()),
            "guest_seconds": round(self.guest_seconds, 6),
            "hypervisor_seconds": round(self.hypervisor_seconds, 6),
            "wall_seconds": round(self.wall_seconds, 6),
            "load_seconds": round(self.load_seconds, 6),
            "virtual_tsc": self.tsc,
            "idle_skips": self.idle_skips,
            "idle_virtual_ns": self.idle_ns,
            "deferred_upcalls": self.deferred,
            "slices": self.slices,
            "phases": {str(k): p.as_dict() for k, p in sorted(self.phases.items())},
        }

    def render(self) -> str:
        lines = [f"mode {self.mode}: {self.total_exits} exits; guest {self.guest_seconds:.3f} s, "
                 f"hypervisor {self.hypervisor_seconds:.3f} s, load {self.load_seconds:.3f} s, "
                 f"wall {self.wall_seconds:.3f} s"]
        width = max((len(r) for r in list(self.exits) + list(self.batched) + list(self.events)), default=0)
        lines += [f"  {reason.ljust(width)}  {n:>9}" for reason, n in self.exits.most_common()]
        if self.idle_skips or self.deferred or self.slices:
            lines.append(f"  idle skips {self.idle_skips} ({self.idle_ns / 1e6:.3f} ms virtual), "
                         f"deferred upcalls {self.deferred}, slices run out {self.slices}")
        if self.batched:
            lines.append("  batched in multicalls (no exit of their own):")
            lines += [f"  {name.ljust(width)}  {n:>9}" for name, n in self.batched.most_common()]
        if self.events:
            lines.append("  done by the CPU, no exit:")
            lines += [f"  {name.ljust(width)}  {n:>9}" for name, n in self.events.most_common()]
        return "\n".join(lines)

"""Test support for the benchmark tests: run results and kernels without running anything."""
from __future__ import annotations

from collections import Counter

from pvtool.tools import bench
from runtime.hypervisor import RunResult
from runtime.stats import Stats


def fake_result(mode: str, console: bytes = b"ok\n", status: int = 0, reason: str = "shutdown",
                exits: dict[str, int] | None = None, wall: float = 0.0, load: float = 0.0,
                hypervisor: float = 0.0, run: float = 0.0, phases: dict | None = None) -> RunResult:
    """What the hypervisor would return: these exits and times, and the runtime's `Phase`s if given."""
    stats = Stats(mode, exits=Counter(exits or {}), wall_seconds=wall, load_seconds=load,
                  hypervisor_seconds=hypervisor, run_seconds=run, phases=phases or {})
    stats.total_exits = sum(stats.exits.values())
    return RunResult(status, reason, "" if reason == "shutdown" else f"{reason}: stopped", console, stats)


def fake_kernels(*names: str) -> list[bench.Kernel]:
    return [bench.Kernel(n, {"native": f"{n}-native".encode(), "pv": f"{n}-pv".encode()}) for n in names]

"""User-mode bounces: what an exception or a system call bounced through the hypervisor costs it.

    python bench/bounce_bench.py [--repeat R] [--mode pv|trap] [--json]

Runs kernels/lmbench.pvk, whose user processes make system calls and take
page faults, and times the runtime's part of every exit: the Python hook
Unicorn calls, from entry to return (a `perf_counter` pair around the run
loop's exit wrapper, `Runner._hook`, put there by this script only).
Unicorn's own side of an exit is not in it; hypercall_bench.py measures the
whole round trip of a tight loop.  Here the guest does real work between
exits, so each exit runs with the host's caches as that work left them.

Prints, per exit reason, the exits of one run and the 10th, 50th and 90th
percentile of their hook time in microseconds (each the smallest over
--repeat runs, so a busy machine shows less), and an empty Python hook on a
bare Unicorn measured in between, as hypercall_bench.py does.  Issue #15's
goal: an exception or a system call bounced through the runtime costs at
most 15 us (`exception 14`, and `system call` in pv or `syscall` under
trap: the median).  Nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from time import perf_counter

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from hypercall_bench import empty_hook_microseconds   # noqa: E402
from pvtool.driver import compile_file               # noqa: E402
from runtime import run as run_loop                  # noqa: E402
from runtime.hypervisor import run                   # noqa: E402

KERNEL = ROOT / "kernels" / "lmbench.pvk"
# the bounces (a system call is "system call" in pv, "syscall" under trap), then the way back and pv's batch
SHOWN = ("exception 14", "system call", "syscall", "hypercall iret", "trap iretq", "hypercall multicall")
BOUNCES = ("exception 14", "system call", "syscall")
GOAL_US = 15.0


def timed_run(image: bytes, mode: str) -> dict[str, list[float]]:
    """One run of `image`; the hook time of each exit in microseconds, by exit reason."""
    samples: dict[str, list[float]] = {}
    plain = run_loop.Runner._hook

    def timing(runner: run_loop.Runner, kind: run_loop.Exit):
        hook, changed = plain(runner, kind)
        stats = runner.vm.stats

        def timed(*args):
            before = stats.total_exits
            start = perf_counter()
            result = hook(*args)
            elapsed = perf_counter() - start
            if stats.total_exits != before:             # an exit, not the CPU's own work
                samples.setdefault(stats.current_reason, []).append(elapsed * 1e6)
            return result
        return timed, changed

    run_loop.Runner._hook = timing
    try:
        result = run(image, mode, timeout=None)
    finally:
        run_loop.Runner._hook = plain
    if result.reason != "shutdown":
        raise SystemExit(f"bounce_bench: {KERNEL.name} did not shut down: {result.message}")
    return samples


def percentiles(values: list[float]) -> tuple[float, float, float]:
    ordered = sorted(values)
    n = len(ordered)
    return ordered[n // 10], ordered[n // 2], ordered[9 * n // 10]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=3, help="runs of the kernel; each figure is the smallest")
    parser.add_argument("--mode", choices=("pv", "trap"), default="pv", help="where bounces exit (default pv)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    image = compile_file(str(KERNEL), "pv" if args.mode == "pv" else "native")
    best: dict[str, dict[str, float]] = {}
    empty = float("inf")
    for _ in range(args.repeat):
        for reason, values in timed_run(image, args.mode).items():
            row = best.setdefault(reason, {"exits": len(values), "p10": float("inf"), "p50": float("inf"),
                                           "p90": float("inf")})
            for key, value in zip(("p10", "p50", "p90"), percentiles(values)):
                row[key] = min(row[key], value)
        empty = min(empty, empty_hook_microseconds(100_000, b"\x0f\x05", intr=False))
    shown = {reason: best[reason] for reason in SHOWN if reason in best}
    if args.json:
        print(json.dumps({"mode": args.mode, "empty_hook_us": empty, "goal_us": GOAL_US, "exits": shown}))
        return 0
    print(f"{KERNEL.name}, {args.mode}: hook time per exit (us), smallest of {args.repeat} runs")
    print(f"{'exit':22s} {'exits':>6s} {'p10':>7s} {'p50':>7s} {'p90':>7s} {'p50 / empty hook':>17s}")
    for reason, row in shown.items():
        print(f"{reason:22s} {row['exits']:6d} {row['p10']:7.1f} {row['p50']:7.1f} {row['p90']:7.1f} "
              f"{row['p50'] / empty:16.1f}x")
    print(f"{'empty Unicorn hook':22s} {'':6s} {'':7s} {empty:7.2f}")
    for reason in BOUNCES:
        if reason in shown:
            p50 = shown[reason]["p50"]
            verdict = "meets" if p50 <= GOAL_US else "misses"
            print(f"{reason}: median {p50:.1f} us ({verdict} the {GOAL_US:g} us goal)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

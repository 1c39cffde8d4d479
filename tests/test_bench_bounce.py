"""bench/bounce_bench.py: it times every bounce of a run of kernels/lmbench.pvk and names it right.

The exit counts come from the kernel (tests/test_lmbench.py counts them from its code): two
phases of 512 page faults, and the system calls of all seven phases.  A timing wrapper that
missed exits, or counted the CPU's own work or another reason under a bounce's name, would not
give them."""
from __future__ import annotations

import json
import subprocess
import sys

from kernels import ROOT

PAGE_FAULTS = 2 * 512


def bounce_bench(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "bounce_bench.py"), *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_every_bounce_is_timed_under_its_own_name():
    done = bounce_bench("--repeat", "1", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    exits = report["exits"]
    assert exits["exception 14"]["exits"] == PAGE_FAULTS
    assert exits["system call"]["exits"] == exits["hypercall iret"]["exits"] - PAGE_FAULTS
    assert "syscall" not in exits                       # trap's name for it: not in a pv run
    for row in exits.values():
        assert 0 < row["p10"] <= row["p50"] <= row["p90"]
    assert report["empty_hook_us"] > 0 and report["goal_us"] == 15


def test_a_bad_repeat_is_a_usage_error():
    done = bounce_bench("--repeat", "0")
    assert done.returncode == 2 and "--repeat must be at least 1" in done.stderr
    assert "Traceback" not in done.stderr

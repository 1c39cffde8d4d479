"""kernels/unix.pvk beyond what test_equivalence compares (its console and status in every mode):
that each run ends cleanly, that the misbehaving programs are killed for the right fault while the
others go on, and that the exits by reason are the ones each mode must make.

The counts below come from the programs, not from a run: 9 heap pages are touched for the first
time (fork: 1 in the parent, 1 in the child, 1 in the parent again; the workers with pids 5, 6 and 7:
pid % 3 + 1 pages each, 3 + 1 + 2), and three programs die of a page fault, so 12 page faults; one
division by zero and one privileged instruction.
"""
from __future__ import annotations

import re

import pytest

import kernels
from pvtool import driver
from runtime import hypervisor

UNIX = kernels.PROJECT_KERNELS / "unix.pvk"
MODES = ("bare", "trap", "pv", "hvm", "hvm-shadow")
PAGE_FAULTS = 12
# the vectors whose exceptions the hypervisor sees first (an exit), by mode
EXCEPTIONS_EXIT = {"bare": set(), "trap": {0, 13, 14}, "pv": {0, 13, 14}, "hvm": set(), "hvm-shadow": {14}}
TIMER = {"bare": "interrupt 32", "trap": "interrupt 32", "pv": "upcall 32", "hvm": "external interrupt 32",
         "hvm-shadow": "external interrupt 32"}
ROOT_SWITCH = {"trap": "trap mov to cr3", "hvm-shadow": "CR3 load"}     # pv: batched, below


@pytest.fixture(scope="module")
def runs():
    images = {target: driver.compile_file(str(UNIX), target) for target in ("native", "pv")}
    return {mode: hypervisor.run(images["pv" if mode == "pv" else "native"], mode, timeout=120)
            for mode in MODES}


@pytest.mark.parametrize("mode", MODES)
def test_the_run_ends_cleanly(runs, mode):
    result = runs[mode]
    assert (result.reason, result.status, result.message) == ("shutdown", 0, "")


KILLS = [  # program, what it announced, the kernel's reason, the vector in its status
    ("divide", "divide: 7 / 0", "divide error (#DE)", 0),
    ("privileged", "privileged: executing cli at CPL 3", "general protection fault (#GP)", 13),
    ("snoop", "snoop: reading kernel memory at 0x1000000",
     "page fault (#PF), user read at 0x1000000 (kernel memory)", 14),
    ("hypercall", "hypercall: calling the shutdown entry of the hypercall page at 0x100020",
     "page fault (#PF), user execute at 0x100020 (kernel memory)", 14),
    ("scribble", "scribble: masking events through the shared page at 0x2000",
     "page fault (#PF), user write at 0x2000 (kernel memory)", 14),
]


@pytest.mark.parametrize("program,announced,reason,vector", KILLS, ids=[k[0] for k in KILLS])
def test_each_misbehaving_program_is_killed_and_the_next_one_runs(runs, program, announced, reason, vector):
    lines = runs["pv"].console.decode().splitlines()
    at = lines.index(announced)
    killed = re.fullmatch(r"kernel: pid (\d+) killed: (.*)", lines[at + 1])
    assert killed and killed.group(2) == reason
    assert lines[at + 2] == f"{program} (pid {killed.group(1)}): killed by the kernel (vector {vector})"
    assert lines.index("init: wait with no children left: refused, error 10") > at + 2   # init went on


def test_forged_pointers_are_refused_not_faulted(runs):
    lines = [l for l in runs["pv"].console.decode().splitlines() if l.startswith("forge: ")]
    assert len(lines) == 7 and all(": refused, error " in l for l in lines)
    assert runs["pv"].stats.exits["exception 14"] == PAGE_FAULTS    # none of them faulted in the kernel


@pytest.mark.parametrize("mode", MODES)
def test_user_faults_exit_only_where_the_hypervisor_sees_them_first(runs, mode):
    stats = runs[mode].stats
    for vector, count in ((0, 1), (13, 1), (14, PAGE_FAULTS)):
        exits, events = stats.exits[f"exception {vector}"], stats.events[f"exception {vector}"]
        assert (exits, events) == ((count, 0) if vector in EXCEPTIONS_EXIT[mode] else (0, count))


def test_system_calls_bounce_through_the_hypervisor_in_trap_and_pv_only(runs):
    calls = runs["pv"].stats.exits["system call"]
    assert calls > 100
    assert runs["trap"].stats.exits["syscall"] == calls
    for mode in ("bare", "hvm", "hvm-shadow"):
        assert runs[mode].stats.events["syscall"] == calls and runs[mode].stats.exits["syscall"] == 0
    assert runs["pv"].stats.exits["hypercall from user mode"] == 0    # the page fault came first


@pytest.mark.parametrize("mode", MODES)
def test_the_timer_preempts_and_roots_switch(runs, mode):
    stats = runs[mode].stats
    assert stats.exits[TIMER[mode]] >= 1             # the spinner gives init the processor back only so
    if mode in ROOT_SWITCH:
        assert stats.exits[ROOT_SWITCH[mode]] > 29   # at least one switch into each of the 29 processes
    elif mode == "pv":                              # a switch is one multicall with its kernel stack
        assert stats.batched["new_baseptr"] > 29 and stats.batched["stack_switch"] > 29
        assert "hypercall new_baseptr" not in stats.exits and "hypercall stack_switch" not in stats.exits
    else:
        assert not any("cr3" in reason.lower() for reason in stats.exits)

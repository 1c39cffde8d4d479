"""kernels/lmbench.pvk and `pvtool bench`'s per-operation report: the exits each operation makes in
each mode, counted from the kernel's code (below) and checked against the phases the runtime
measured; the phase names; `--markdown`; and that docs/bench.md and README.md hold the tables it
prints today.

Counting from the code (lib/proc.pvk, lib/vm.pvk, kernels/lmbench.pvk).  A phase is opened and
closed by a system call, so trap and pv see one more return (`trap iretq`, `hypercall iret`) and one
more system-call entry than the operations make.  A system call exits twice in trap (`syscall`,
then the trapped `iretq`) and in pv (the bounce, then the `iret` hypercall), never in bare, hvm or
hvm-shadow.  The first page of a fresh page table also writes the directory entry above it.
"""
from __future__ import annotations

from collections import Counter

import pytest
from bench_fakes import fake_kernels, fake_result

import kernels
from pvtool import cli
from pvtool.tools import bench, costmodel
from runtime.devices.marker import Phase

LMBENCH = kernels.PROJECT_KERNELS / "lmbench.pvk"
ROOT = kernels.ROOT
MODEL = costmodel.load().choose(None)
N_NULL, SWITCHES, N_FORK, N_PAGES, RUNS, ROUNDS = 1000, 1000, 100, 512, 8, 200

EXPECTED = {   # phase -> mode -> exits by reason (the reasons named; others must be absent)
    1: {"trap": {"syscall": N_NULL + 1, "trap iretq": N_NULL + 1},
        "pv": {"system call": N_NULL + 1, "hypercall iret": N_NULL + 1}, "hvm-shadow": {}},
    2: {"trap": {"syscall": SWITCHES + 1, "trap iretq": SWITCHES + 1, "trap mov to cr3": SWITCHES},
        "pv": {"system call": SWITCHES + 1, "hypercall iret": SWITCHES + 1,
               "hypercall multicall": SWITCHES},           # new_baseptr and stack_switch, batched together
        "hvm-shadow": {"CR3 load": SWITCHES}},
    # fork, exit and wait are three calls; two switches (to the child as the parent waits, back at its exit)
    3: {"trap": {"syscall": 3 * N_FORK + 1, "trap iretq": 3 * N_FORK + 1, "trap mov to cr3": 2 * N_FORK},
        "pv": {"system call": 3 * N_FORK + 1, "hypercall iret": 3 * N_FORK + 1, "hypercall multicall": 2 * N_FORK},
        "hvm-shadow": {"CR3 load": 2 * N_FORK}},
    # each fault: the exception, cr2 (trapped in trap, the shared page in pv), one entry written
    4: {"trap": {"exception 14": N_PAGES, "trap mov from cr2": N_PAGES, "page-table write": N_PAGES + 1,
                 "trap iretq": N_PAGES + 1, "syscall": 1},
        "pv": {"exception 14": N_PAGES, "hypercall multicall": N_PAGES + 1, "hypercall iret": N_PAGES + 1,
               "system call": 1},
        "hvm-shadow": {"exception 14": N_PAGES, "page-table write (shadow)": N_PAGES + 1}},
    # each fault: the entry made writable and its TLB entry flushed, in one multicall in pv
    5: {"trap": {"exception 14": N_PAGES, "trap mov from cr2": N_PAGES, "page-table write": N_PAGES,
                 "trap invlpg": N_PAGES, "trap iretq": N_PAGES + 1, "syscall": 1},
        "pv": {"exception 14": N_PAGES, "hypercall multicall": N_PAGES, "hypercall iret": N_PAGES + 1,
               "system call": 1},
        "hvm-shadow": {"exception 14": N_PAGES, "page-table write (shadow)": N_PAGES, "INVLPG": N_PAGES}},
    # 8 map calls of 64 (one multicall each in pv) and 8 unmap calls (128 entries: two multicalls)
    6: {"trap": {"page-table write": 2 * N_PAGES + 1, "trap invlpg": N_PAGES, "syscall": 2 * RUNS + 1,
                 "trap iretq": 2 * RUNS + 1},
        "pv": {"hypercall multicall": 3 * RUNS + 1, "system call": 2 * RUNS + 1, "hypercall iret": 2 * RUNS + 1},
        "hvm-shadow": {"page-table write (shadow)": 2 * N_PAGES + 1, "INVLPG": N_PAGES}},
    # a round: yield (in pv one multicall for the switch), map 8, unmap 8; one new page table per process
    7: {"trap": {"page-table write": 16 * ROUNDS + 2, "trap invlpg": 8 * ROUNDS},
        "pv": {"hypercall multicall": 3 * ROUNDS + 4},
        "hvm-shadow": {"page-table write (shadow)": 16 * ROUNDS + 2, "INVLPG": 8 * ROUNDS}},
}
OPERATIONS = {1: N_NULL, 2: SWITCHES, 3: N_FORK, 4: N_PAGES, 5: N_PAGES, 6: N_PAGES, 7: ROUNDS}
# What the hypervisor does besides the operations: a table page of an earlier process's hierarchy,
# remembered as validated, is released when the kernel first writes it as data again.
RELEASES = {"table page released"}
REGENERATE = "python -m pvtool bench kernels/lmbench.pvk --repeat 1 --markdown"
slow = pytest.mark.slow                         # the fixture runs lmbench in five modes


@pytest.fixture(scope="module")
def rows():
    kernel = bench.build(LMBENCH, "lmbench", list(bench.MODES))
    return bench.measure([kernel], list(bench.MODES), 1, timeout=120, model=MODEL)


def phases_of(rows, mode):
    return {p.phase: p for r in rows if r.mode == mode for p in r.phases}


@slow
@pytest.mark.parametrize("mode", bench.MODES)
def test_every_phase_is_marked_once_with_its_operations_and_name(rows, mode):
    phases = phases_of(rows, mode)
    assert {k: (p.runs, p.operations) for k, p in phases.items()} == {k: (1, n) for k, n in OPERATIONS.items()}
    assert phases[1].name == "null system call (getpid)" and phases[7].name == "churn mix, per round"


@slow
@pytest.mark.parametrize("mode", ["bare", "hvm"])
def test_nothing_exits_without_a_hypervisor_in_the_way(rows, mode):
    assert {k: p.exits for k, p in phases_of(rows, mode).items()} == {k: 0 for k in OPERATIONS}


@slow
@pytest.mark.parametrize("phase", sorted(EXPECTED))
@pytest.mark.parametrize("mode", ["trap", "pv", "hvm-shadow"])
def test_exits_by_reason_are_the_ones_the_code_makes(rows, mode, phase):
    got = dict(phases_of(rows, mode)[phase].exits_by_reason)
    want = EXPECTED[phase][mode]
    assert {why: got.get(why, 0) for why in want} == want
    if phase != 7:                              # 7: only its page-table traffic is counted above
        assert set(got) - set(want) <= RELEASES


@slow
def test_the_documents_hold_todays_tables(rows):
    blocks = bench.markdown(rows, MODEL).rstrip("\n").split("\n\n")
    docs = (ROOT / "docs" / "bench.md").read_text()
    at = 0
    for block in blocks:                     # each table and title, in order, with prose between them
        found = docs.find(block, at)
        assert found >= 0, f"docs/bench.md lacks, or has out of order:\n{block}\nregenerate with {REGENERATE}"
        at = found + len(block)
    assert blocks[0] in (ROOT / "README.md").read_text(), "README.md: regenerate with " + REGENERATE


# -- the report, without running anything -------------------------------------------------------

def test_phase_names_come_from_the_header():
    source = "// phase 2: context switch (yield)\n//phase 3: not this\n// phase 10: ten \n"
    assert bench.phase_names(source) == {2: "context switch (yield)", 10: "ten"}


def fake_phases(mode):
    exits = {"trap": {"syscall": 1001, "trap iretq": 1001}, "pv": {"system call": 1001, "hypercall iret": 1001}}
    return fake_result(mode, phases={1: Phase(1, 1, 1000, Counter(exits[mode]), 2002, 2_003_000, 0.1),
                                     9: Phase(9, 2, 0, Counter(), 0, 0, 0.0)})


def test_markdown_tables_per_phase_with_a_summary():
    kernel = fake_kernels("k")[0]
    kernel.phase_names = {1: "null call"}
    rows = bench.measure([kernel], ["trap", "pv"], 1, runner=lambda image, mode, t: fake_phases(mode), model=MODEL)
    text = bench.markdown(rows, MODEL)
    blocks = text.split("\n\n")
    assert blocks[0].splitlines() == ["| exits per operation | trap | pv |", "|---|---:|---:|",
                                      "| k 1: null call | 2.00 | 2.00 |", "| k 9 | 0.00 | 0.00 |"]
    assert blocks[1] == "**k, phase 1: null call** (1000 operations)"
    table = blocks[2].splitlines()
    assert table[0] == "| mode | exits per op | by reason, per op | modelled ns per op |"
    assert table[2] == f"| trap | 2.002 | syscall 1, trap iretq 1 | {2.002 * 2000 / 2.93:.0f} |"
    assert blocks[3] == "**k, phase 9** (2 runs)"
    assert text.endswith(f"Modelled: cost model {MODEL.describe()}.\n")
    assert "2003" not in text and "0.1" not in text           # no times: the same text on every run


def test_markdown_leaves_out_reasons_below_the_threshold_but_counts_them():
    assert bench._reasons({"syscall": 0.004, "page-table write": 2.0, "trap invlpg": 1.0, "x": 0.031}) == \
        "page-table write 2, trap invlpg 1, x 0.03"


def test_markdown_without_phases_or_model():
    rows = bench.measure(fake_kernels("plain"), ["pv"], 1, runner=lambda image, mode, t: fake_result(mode))
    assert bench.markdown(rows, None) == "*plain marks no phases.*\n"


def test_markdown_on_the_command_line(capsys):
    assert cli.main(["bench", str(ROOT / "kernels" / "hello.pvk"), "--modes", "bare", "--repeat", "1",
                     "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("*hello marks no phases.*\n") and "run s" not in out


def test_markdown_and_json_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--markdown", "--json"])
    assert e.value.code == 2 and "not allowed with" in capsys.readouterr().err

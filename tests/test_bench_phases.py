"""`pvtool bench` per operation: the phases a kernel marks on port 0x80 (runtime/devices/marker.py)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from bench_fakes import fake_kernels, fake_result

from pvtool import cli
from pvtool.tools import bench, costmodel
from runtime.devices.marker import Phase

MODEL = costmodel.load().choose("nehalem")
EXIT_NS = 2000 / 2.93


def phase(phase_id: int, operations: int, exits: dict[str, int], virtual_ns: int, host: float, runs: int = 1):
    return Phase(phase_id, runs, operations, Counter(exits), sum(exits.values()), virtual_ns, host)


def fake_runner(hosts: dict[str, list[float]]):
    """Phase 3 (1,000 operations) and phase 9 (no operations declared), per mode; host time per repeat."""
    exits = {"bare": {}, "trap": {"trap cli": 2000, "page-table write": 1000}, "pv": {"hypercall multicall": 16}}
    calls = Counter()

    def runner(image, mode, timeout):
        host = hosts[mode][calls[mode]]
        calls[mode] += 1
        return fake_result(mode, exits=exits[mode], phases={
            3: phase(3, 1000, exits[mode], 5_000_000, host),
            9: phase(9, 0, {"hypercall shutdown": 1} if mode == "pv" else {}, 100, 0.001, runs=2)})
    return runner


def test_figures_per_operation_from_fake_stats():
    hosts = {"bare": [0.01, 0.03, 0.02], "trap": [0.5, 0.4, 0.6], "pv": [0.05, 0.04, 0.06]}
    rows = bench.measure(fake_kernels("k"), ["bare", "trap", "pv"], 3, runner=fake_runner(hosts), model=MODEL)
    bare, trap, pv = rows
    three = trap.phases[0]
    assert (three.phase, three.per, three.unit, three.exits) == (3, 1000, "op", 3000)
    assert three.host_seconds == 0.5                                    # the median of the repeats
    doc = three.as_dict()
    assert doc["exits_per_op"] == 3.0 and doc["exits_by_reason_per_op"] == {"trap cli": 2.0, "page-table write": 1.0}
    assert doc["virtual_ns_per_op"] == 5000.0 and doc["host_us_per_op"] == 500.0
    assert doc["modelled_ns_per_op"] == pytest.approx(3 * EXIT_NS, abs=0.1)
    assert pv.phases[0].as_dict()["modelled_ns_per_op"] == pytest.approx(0.016 * EXIT_NS, abs=0.1)
    assert bare.phases[0].as_dict()["modelled_ns_per_op"] == 0
    nine = pv.phases[1]
    assert (nine.per, nine.unit) == (2, "run")                          # no operations declared: per run
    assert nine.as_dict()["exits_per_op"] == 0.5


def test_phase_table_puts_the_modes_of_a_phase_together():
    hosts = {m: [0.01] for m in ("bare", "trap", "pv")}
    rows = bench.measure(fake_kernels("k"), ["bare", "trap", "pv"], 1, runner=fake_runner(hosts), model=MODEL)
    text = bench.table(rows, MODEL)
    section = text.split("per operation, by marked phase")[1].splitlines()[1:]
    assert section[0].split()[:5] == ["kernel", "phase", "mode", "per", "count"]
    assert "modelled ns" in section[0]
    body = [line.split() for line in section[1:]]
    assert [(b[1], b[2], b[3]) for b in body] == [("3", m, "op") for m in ("bare", "trap", "pv")] + \
        [("9", m, "run") for m in ("bare", "trap", "pv")]
    trap3 = section[2]
    assert "trap cli 2, page-table write 1" in trap3 and f"{3 * EXIT_NS:.1f}" in trap3


def test_no_phases_no_section():
    rows = bench.measure(fake_kernels("k"), ["pv"], 1, runner=lambda image, mode, t: fake_result(mode))
    assert rows[0].phases == [] and "per operation" not in bench.table(rows, MODEL)


MARKED = """
fn kmain() -> u64 {
    outl(0x80, (50 << 8) | 4);
    for i in 0..50 { wbinvd(); }
    outl(0x80, 0);
    return 0;
}
"""


def test_a_marked_kernel_through_the_command(capsys, tmp_path):
    source = tmp_path / "marked.pvk"
    source.write_text(MARKED)
    assert cli.main(["bench", str(source), "--repeat", "2", "--json"]) == 0
    rows = {r["mode"]: r for r in json.loads(capsys.readouterr().out)}
    for mode, reason in (("bare", None), ("trap", "trap wbinvd"), ("pv", "hypercall wbinvd"), ("hvm", "WBINVD"),
                         ("hvm-shadow", "WBINVD")):
        four, = rows[mode]["phases"]
        assert (four["phase"], four["operations"], four["runs"], four["per"]) == (4, 50, 1, "op")
        assert four["exits_by_reason_per_op"] == ({} if reason is None else {reason: 1.0})
        assert four["modelled_ns_per_op"] == (0 if reason is None else pytest.approx(EXIT_NS, abs=0.1))
        assert four["host_us_per_op"] > 0
    assert cli.main(["bench", str(source), "--repeat", "1", "--modes", "trap,pv"]) == 0
    out = capsys.readouterr().out
    assert "per operation, by marked phase" in out and "trap wbinvd 1" in out and "hypercall wbinvd 1" in out

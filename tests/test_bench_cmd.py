"""`pvtool bench` and bench/code_quality.py: rows, checks, times, progress line, errors.

The cost model, the phases and the picture have their own files
(test_bench_costs.py, test_bench_phases.py, test_bench_plot.py)."""
from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from bench_fakes import fake_kernels, fake_result

from pvtool import cli
from pvtool.tools import bench

ROOT = Path(__file__).resolve().parents[1]
HELLO = str(ROOT / "kernels" / "hello.pvk")
CRITICAL = str(ROOT / "kernels" / "critical.pvk")
ROW_KEYS = {"kernel", "mode", "run_seconds", "guest_seconds", "hypervisor_seconds", "load_seconds", "wall_seconds",
            "exits", "exits_by_reason", "multicall_entries", "ratio_to_bare", "exits_vs_trap", "time_vs_trap",
            "cost_model", "modelled_ns", "phases", "repeats", "status", "samples"}


def bench_json(capsys, *argv: str) -> list[dict]:
    assert cli.main(["bench", *argv, "--json"]) == 0
    out = capsys.readouterr()
    assert out.err == ""                      # no progress line when stderr is not a terminal
    return json.loads(out.out)


class TtyBuffer(io.StringIO):
    def isatty(self) -> bool:
        return True


# -- the command on real kernels ---------------------------------------------------------

def test_hello_rows_for_every_mode(capsys):
    rows = bench_json(capsys, HELLO, "--repeat", "1")
    assert [(r["kernel"], r["mode"]) for r in rows] == [("hello", m) for m in bench.MODES]
    for r in rows:
        assert r.keys() == ROW_KEYS
        assert r["repeats"] == 1 and r["status"] == 0
        assert 0 < r["run_seconds"] < r["wall_seconds"] and 0 < r["load_seconds"] < r["wall_seconds"]
        assert r["guest_seconds"] + r["hypervisor_seconds"] <= r["run_seconds"] + 1e-6
        assert r["samples"] == [r["run_seconds"]]
        assert r["exits"] == sum(r["exits_by_reason"].values()) > 0
    assert rows[0]["ratio_to_bare"] == 1.0
    assert any(k.startswith("hypercall") for k in rows[2]["exits_by_reason"])
    assert rows[2]["exits_vs_trap"] == pytest.approx(rows[2]["exits"] / rows[1]["exits"], rel=1e-3)


def test_table_on_stdout(capsys):
    assert cli.main(["bench", HELLO, "--repeat", "1", "--modes", "pv,bare"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split()[:10] == ["kernel", "mode", "run", "s", "guest", "s", "hyp", "s", "load", "s"]
    assert lines[1].split()[:2] == ["hello", "bare"] and lines[2].split()[0] == "pv"
    assert "trap" not in out.split("exits by reason:")[0].replace("pv/trap", "")
    assert "hello pv: hypercall" in out


def test_critical_pv_exits_fewer_than_trap(capsys):
    rows = {r["mode"]: r for r in bench_json(capsys, CRITICAL, "--repeat", "1", "--modes", "trap,pv")}
    assert rows["pv"]["exits"] < rows["trap"]["exits"]
    assert rows["pv"]["exits_vs_trap"] < 0.01       # 30,000 critical sections cost pv no exit
    assert rows["trap"]["exits_by_reason"]["trap pushfq"] >= 30000
    assert rows["trap"]["ratio_to_bare"] is None      # bare not run


# -- measure(): interleaving and checks, with a fake hypervisor ----------------------------

def test_runs_interleave_repeat_kernel_mode():
    calls = []

    def runner(image, mode, timeout):
        calls.append((image.decode(), mode))
        return fake_result(mode)

    rows = bench.measure(fake_kernels("a", "b"), ["bare", "trap", "pv"], 2, runner=runner)
    one_round = [("a-native", "bare"), ("a-native", "trap"), ("a-pv", "pv"),
                 ("b-native", "bare"), ("b-native", "trap"), ("b-pv", "pv")]
    assert calls == one_round * 2
    assert [(r.kernel, r.mode, r.repeats) for r in rows] == [(k, m, 2) for k in "ab" for m in ("bare", "trap", "pv")]


def test_ratios_from_exits():
    exits = {"trap": {"trap cli": 90, "trap out": 10}, "pv": {"hypercall multicall": 5}, "bare": {}}
    rows = bench.measure(fake_kernels("k"), ["bare", "trap", "pv"], 1,
                         runner=lambda image, mode, t: fake_result(mode, exits=exits[mode]))
    pv = rows[2]
    assert pv.exits == 5 and pv.exits_vs_trap == pytest.approx(0.05)
    assert rows[1].exits_by_reason == {"trap cli": 90, "trap out": 10}
    assert rows[0].exits_vs_trap is None and rows[1].time_vs_trap is None


def test_ratios_compare_the_run_without_loading():
    # loading takes 1 s in every mode; the runs take 0.1, 0.8 and 0.2 s: wall-clock ratios would say
    # 1.1 : 1.8 : 1.2, the runs say 1 : 8 : 2
    times = {"bare": (1.1, 1.0), "trap": (1.8, 1.0), "pv": (1.2, 1.0)}
    rows = bench.measure(fake_kernels("k"), ["bare", "trap", "pv"], 1, runner=lambda image, mode, t: fake_result(
        mode, wall=times[mode][0], load=times[mode][1], run=times[mode][0] - 1.05, hypervisor=0.01))
    bare, trap, pv = rows
    assert [r.run_seconds for r in rows] == pytest.approx([0.1, 0.8, 0.2])
    assert [r.load_seconds for r in rows] == [1.0, 1.0, 1.0] and [r.wall_seconds for r in rows] == [1.1, 1.8, 1.2]
    assert trap.ratio_to_bare == pytest.approx(8.0) and pv.ratio_to_bare == pytest.approx(2.0)
    assert pv.time_vs_trap == pytest.approx(0.25)
    assert pv.hypervisor_seconds == 0.01 and pv.guest_seconds == pytest.approx(0.14)


def test_times_are_medians_of_the_repeats():
    walls = iter([1.5, 1.2, 9.0])                 # one slow outlier
    rows = bench.measure(fake_kernels("k"), ["pv"], 3,
                         runner=lambda image, mode, t: fake_result(mode, wall=next(walls), load=1.0))
    assert rows[0].samples == pytest.approx([0.5, 0.2, 8.0])
    assert rows[0].run_seconds == pytest.approx(0.5) and rows[0].wall_seconds == 1.5


def test_default_kernels_are_in_the_repository(capsys, monkeypatch):
    assert all(p.is_file() for p in bench.DEFAULT_KERNELS)
    monkeypatch.setattr(bench, "_default_runner", lambda image, mode, t: fake_result(mode))
    monkeypatch.setattr(bench, "build", lambda path, name, modes: bench.Kernel(name, {"native": b"", "pv": b""}))
    assert cli.main(["bench", "--repeat", "1", "--json"]) == 0
    kernels = [r["kernel"] for r in json.loads(capsys.readouterr().out)]
    assert list(dict.fromkeys(kernels)) == ["churn", "critical", "sieve", "tasks"]
    assert len(kernels) == 4 * len(bench.MODES)


def test_console_mismatch_is_an_error():
    runner = lambda image, mode, t: fake_result(mode, b"ok\n" if mode != "pv" else b"oops\n")  # noqa: E731
    with pytest.raises(bench.BenchError, match=r"k: console output in pv mode differs from bare.*'ok' vs 'oops'"):
        bench.measure(fake_kernels("k"), ["bare", "trap", "pv"], 1, runner=runner)


def test_status_mismatch_and_no_shutdown_are_errors():
    with pytest.raises(bench.BenchError, match="exit status 3 in trap mode but 0 in bare"):
        bench.measure(fake_kernels("k"), ["bare", "trap"], 1,
                      runner=lambda image, mode, t: fake_result(mode, status=3 if mode == "trap" else 0))
    with pytest.raises(bench.BenchError, match="k in pv mode did not shut down: timeout"):
        bench.measure(fake_kernels("k"), ["pv"], 1,
                      runner=lambda image, mode, t: fake_result(mode, reason="timeout"))


def test_mismatch_through_the_command(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_default_runner",
                        lambda image, mode, t: fake_result(mode, b"pv\n" if mode == "pv" else b"native\n"))
    assert cli.main(["bench", HELLO, "--repeat", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pvtool bench: hello: console output in pv mode differs")
    assert err.count("\n") == 1


# -- progress line ----------------------------------------------------------------------

def test_progress_line_only_on_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(bench, "_default_runner", lambda image, mode, t: fake_result(mode))
    tty = TtyBuffer()
    monkeypatch.setattr(sys, "stderr", tty)
    assert cli.main(["bench", HELLO, "--repeat", "2", "--json", "--modes", "bare,trap,pv"]) == 0
    shown = tty.getvalue()
    assert shown.count("\r") >= 6 and "[6/6] repeat 2/2: hello pv" in shown
    assert shown.endswith("\r") and shown.rsplit("\r", 2)[1].strip() == ""    # cleared at the end
    assert len(json.loads(capsys.readouterr().out)) == 3

    piped = io.StringIO()
    monkeypatch.setattr(sys, "stderr", piped)
    assert cli.main(["bench", HELLO, "--repeat", "2", "--json"]) == 0
    assert piped.getvalue() == ""


# -- bad input --------------------------------------------------------------------------

def test_missing_and_wrong_kernels(capsys, tmp_path):
    assert cli.main(["bench", str(tmp_path / "none.pvk")]) == 2
    assert capsys.readouterr().err.strip().endswith("none.pvk: no such kernel")
    elf = tmp_path / "k.elf"
    elf.write_bytes(b"\x7fELF")
    assert cli.main(["bench", str(elf)]) == 2
    assert "not a .pvk kernel source" in capsys.readouterr().err


def test_compile_error_exits_1(capsys, tmp_path):
    bad = tmp_path / "bad.pvk"
    bad.write_text("fn kmain() -> u64 { return nothing; }\n")
    assert cli.main(["bench", str(bad), "--repeat", "1"]) == 1
    err = capsys.readouterr().err
    assert "error: unknown name 'nothing'" in err and "Traceback" not in err


@pytest.mark.parametrize("argv", [["--repeat", "0"], ["--repeat", "x"], ["--modes", "bare,fast"],
                                  ["--modes", ","], ["--timeout", "-1"]])
def test_bad_options_exit_2(capsys, argv):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", HELLO, *argv])
    assert e.value.code == 2
    assert "pvtool bench: error: argument" in capsys.readouterr().err


def test_guest_that_never_stops(capsys, tmp_path):
    loop = tmp_path / "loop.pvk"
    loop.write_text("fn kmain() -> u64 {\n    var x: u64 = 1;\n    while x > 0 { x = x + 1; }\n    return 0;\n}\n")
    assert cli.main(["bench", str(loop), "--modes", "bare", "--repeat", "1", "--timeout", "0.2"]) == 1
    assert "loop in bare mode did not shut down: timeout" in capsys.readouterr().err


def test_parse_modes_orders_and_dedups():
    assert bench.parse_modes("pv, bare,pv") == ["bare", "pv"]
    with pytest.raises(ValueError, match="'qemu'"):
        bench.parse_modes("bare,qemu")


# -- bench/code_quality.py --------------------------------------------------------------

def load_code_quality():
    if "code_quality" not in sys.modules:
        spec = importlib.util.spec_from_file_location("code_quality", ROOT / "bench" / "code_quality.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules["code_quality"] = module            # dataclasses look their module up
        spec.loader.exec_module(module)
    return sys.modules["code_quality"]


def test_code_quality_knows_each_sources_own_functions():
    cq = load_code_quality()
    assert cq.defined_functions(ROOT / "bench" / "c" / "sort.c") == {"sift_down", "heapsort", "kmain"}
    assert cq.defined_functions(ROOT / "kernels" / "checksum.pvk") == {"fill", "adler32", "fnv1a", "kmain"}
    assert cq.expected(ROOT / "kernels" / "sieve.pvk").output.startswith("primes below 1000000: 78498\n")


def run_code_quality(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "code_quality.py"), *argv],
                          capture_output=True, text=True, timeout=300)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")
def test_code_quality_smoke():
    proc = run_code_quality("--repeat", "1", "--json", "sieve")
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [(r["kernel"], r["variant"]) for r in rows] == [("sieve", v) for v in ("pvk", "gcc-O0", "gcc-O2")]
    for r in rows:
        assert r["seconds"] > 0 and r["text_bytes"] >= r["kernel_bytes"] > 0 and r["repeats"] == 1
    assert rows[0]["pvk_time_ratio"] is None
    assert all(r["pvk_time_ratio"] > 0 and r["pvk_size_ratio"] > 0 for r in rows[1:])


def test_code_quality_without_gcc_and_bad_kernel():
    proc = run_code_quality("--repeat", "1", "--json", "--cc", "no-such-cc", "sieve")
    assert proc.returncode == 0, proc.stderr
    assert "no-such-cc not found; skipping the gcc variants" in proc.stderr
    assert [r["variant"] for r in json.loads(proc.stdout)] == ["pvk"]
    proc = run_code_quality("quicksort")
    assert proc.returncode == 2 and "unknown kernel 'quicksort'" in proc.stderr


def test_the_timer_armed_benchmark_computes_the_same_in_every_mode_and_takes_its_ticks(capsys):
    """bench/kernels/armed.pvk: exit-free work under a 1 kHz timer (trap must stay near bare)."""
    rows = bench_json(capsys, str(ROOT / "bench" / "kernels" / "armed.pvk"), "--repeat", "1",
                      "--modes", "bare,trap,pv")
    assert {row["mode"]: row["status"] for row in rows} == {"bare": 0, "trap": 0, "pv": 0}
    for row in rows:
        taken = {"bare": "interrupt 32", "trap": "interrupt 32", "pv": "upcall 32"}[row["mode"]]
        assert row["exits_by_reason"].get(taken, 0) >= 10, row["exits_by_reason"]

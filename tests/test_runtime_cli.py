"""`pvtool run`: stdout is the guest's console, the exit status is the guest's (or 124/125/1/2)."""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from ckit.build import build, have_gcc
from pvtool.cli import build_parser
from pvtool.commands import run as run_command

pytestmark = pytest.mark.skipif(not have_gcc(), reason="gcc is needed to build the test guests")
REPO = Path(__file__).resolve().parents[1]
HELLO_OUT = b"hello from a C paravirtual guest\nand hello through the virtual UART\n"


def cli(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pvtool", "run", *argv], cwd=REPO, capture_output=True)


def args(image, **over) -> argparse.Namespace:
    """The command's own parsed defaults for `pvtool run IMAGE`, with `over` changed."""
    ns = build_parser().parse_args(["run", str(image), "--timeout", "10"])
    for key, value in over.items():
        setattr(ns, key, value)
    return ns


@pytest.fixture(scope="module")
def hello() -> Path:
    return build("hello_pv")


@pytest.fixture(scope="module")
def hostile() -> Path:
    return build("pv_hostile")


def test_stdout_is_exactly_the_console_and_status_is_the_guests(hello):
    done = cli(str(hello))
    assert (done.returncode, done.stdout, done.stderr) == (7, HELLO_OUT, b"")


def test_fault_exits_125_with_one_line_on_stderr(hostile):
    done = cli(str(hostile), "--cmdline", "write-text")
    assert done.returncode == 125 and done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("guest fault: write to read-only")


def test_timeout_exits_124(hostile, capfd):
    """The spinning guest never exits: only the run's watchdog thread can stop it, and it goes with the run."""
    threads = threading.active_count()
    assert run_command.run(args(hostile, cmdline="spin", timeout=0.3)) == 124
    assert "timeout" in capfd.readouterr().err
    assert threading.active_count() == threads


def test_max_exits_exits_124(hostile, capfd):
    assert run_command.run(args(hostile, cmdline="loop", max_exits=10)) == 124
    assert "--max-exits" in capfd.readouterr().err


def test_refused_images_exit_125_in_one_line(tmp_path, hello, capfd):
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"\x7fELF garbage")
    assert run_command.run(args(junk)) == 125
    assert run_command.run(args(hello, mode="bare")) == 125
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 2 and all(line.startswith("pvtool run: ") for line in err)


def test_unreadable_file_and_bad_options_exit_2(tmp_path, hello, capfd):
    assert run_command.run(args(tmp_path / "missing.elf")) == 2
    assert run_command.run(args(hello, memory=1)) == 2          # (a bad --timeout stops in the parser: below)
    assert len(capfd.readouterr().err.splitlines()) == 2


def test_stats_report_exits_by_reason(hello, capfd):
    assert run_command.run(args(hello, stats=True)) == 7
    out = capfd.readouterr()
    assert out.out.encode() == HELLO_OUT
    assert "mode pv: 72 exits" in out.err and "hypercall io_out" in out.err and "wall" in out.err


def test_json_to_stderr_and_to_a_file(hello, tmp_path, capfd):
    assert run_command.run(args(hello, json=True)) == 7
    doc = json.loads(capfd.readouterr().err)
    assert doc["status"] == 7 and doc["exits_by_reason"]["hypercall console_write"] == 1
    assert {"guest_seconds", "wall_seconds", "hypervisor_seconds"} <= set(doc)
    target = tmp_path / "stats.json"
    assert run_command.run(args(hello, stats_file=str(target))) == 7
    assert json.loads(target.read_text())["exits"] == 72
    assert capfd.readouterr().err == ""


def test_trace_logs_each_exit(hello, capfd):
    assert run_command.run(args(hello, trace=True)) == 7
    err = capfd.readouterr().err.splitlines()
    assert len(err) == 72 and err[0].startswith("exit 1 [1.000 us]: hypercall console_write at 0x")
    assert "guest_main+" in err[0]
    stamps = [float(re.search(r"\[([\d.]+) us\]", line).group(1)) for line in err]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]        # virtual time, never backwards


def test_native_image_defaults_to_bare_and_accepts_trap(capfd):
    native = build("native")
    assert run_command.run(args(native, cmdline="hello", stats=True)) == 0
    assert "mode bare" in capfd.readouterr().err
    assert run_command.run(args(native, cmdline="hello", mode="trap", stats=True)) == 0
    assert "trap out" in capfd.readouterr().err


def test_pvk_source_is_built_for_the_mode(tmp_path, capfd):
    src = tmp_path / "three.pvk"
    src.write_text("fn kmain() -> u64 { return 3; }\n")
    for mode in ("pv", "bare", "trap"):
        assert run_command.run(args(src, mode=mode)) == 3
    assert run_command.run(args(src)) == 3


def test_pvk_compile_error_exits_1(tmp_path, capfd):
    bad = tmp_path / "bad.pvk"
    bad.write_text("fn kmain() -> u64 { return nope; }\n")
    assert run_command.run(args(bad)) == 1
    assert "bad.pvk" in capfd.readouterr().err


def test_a_reader_that_goes_away_does_not_kill_the_run():
    """`pvtool run K | head -1`: the guest runs to its end, its status is the exit status, no traceback."""
    proc = subprocess.run(f"{sys.executable} -m pvtool run kernels/critical.pvk --mode pv | head -c 1; "
                          f"exit ${{PIPESTATUS[0]}}", shell=True, executable="/bin/bash", cwd=REPO,
                          capture_output=True)
    assert proc.returncode == 0, proc.stderr.decode()
    assert proc.stdout == b"s"
    assert b"Traceback" not in proc.stderr and b"BrokenPipe" not in proc.stderr


@pytest.mark.parametrize("value", ["inf", "nan", "-1", "soon"])
def test_timeout_must_be_a_finite_number_of_seconds(value):
    proc = cli("kernels/hello.pvk", "--timeout", value)
    assert proc.returncode == 2
    assert b"--timeout" in proc.stderr and b"Traceback" not in proc.stderr


def test_a_command_line_that_is_not_utf8_reaches_the_guest_as_bytes():
    proc = subprocess.run([sys.executable, "-m", "pvtool", "run", "kernels/hello.pvk", b"--cmdline=\xff\xfe"],
                          cwd=REPO, capture_output=True)
    assert proc.returncode == 0 and b"Traceback" not in proc.stderr

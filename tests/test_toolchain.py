"""The images against the standard toolchain, and the command line against bad input.

Every kernel (kernels/ and ../shared/conformance), built for both targets,
must be an ELF file binutils and gdb read without complaint: `readelf -a -W`
prints no warning or error, `nm` shows `kmain` as a text symbol, gdb finds
kmain's source line, and `objdump -d -l` shows .pvk file:line rows inside
`<kmain>` (native build).  The command line must print its help, and turn
hostile input into a located one-line error with a caret, exit status 1
and no traceback.  Last, bench/compile_speed.py runs on a small kernel.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(__file__).resolve().parents[2] / "shared"
KERNELS = kernels.all_kernels()
TARGETS = ("native", "pv")


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed")
    return path


def run(args: list[str], cwd: Path = ROOT, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def pvtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "pvtool", *args], cwd=cwd)


def kmain_line(path: Path) -> int:
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if re.match(r"\s*fn\s+kmain\b", line):
            return n
    raise AssertionError(f"{path}: no fn kmain")


# -- binutils and gdb on every image ------------------------------------------------------------

@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("path", KERNELS, ids=kernels.kernel_id)
def test_readelf_reads_the_image_without_complaint(kernel_image, path, target):
    image = kernel_image(path, target)
    r = run([tool("readelf"), "-a", "-W", str(image)])
    assert r.returncode == 0, r.stderr
    complaints = [line for line in (r.stdout + r.stderr).splitlines() if re.search(r"\b(Warning|Error)\b", line)]
    assert not complaints, "\n".join(complaints[:10])
    assert "Machine:                           Advanced Micro Devices X86-64" in r.stdout


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("path", KERNELS, ids=kernels.kernel_id)
def test_nm_lists_kmain_as_text(kernel_image, path, target):
    r = run([tool("nm"), str(kernel_image(path, target))])
    assert r.returncode == 0, r.stderr
    assert re.search(r"^[0-9a-f]{16} T kmain$", r.stdout, re.M), r.stdout[:2000]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("path", KERNELS, ids=kernels.kernel_id)
def test_gdb_finds_the_source_line_of_kmain(kernel_image, path, target):
    r = run([tool("gdb"), "-nx", "-batch", "-ex", "info line kmain", str(kernel_image(path, target))])
    out = r.stdout + r.stderr
    m = re.search(r'Line (\d+) of "([^"]+)"', out)
    assert m, out
    assert Path(m.group(2)).name == path.name and int(m.group(1)) == kmain_line(path), out


@pytest.mark.parametrize("path", KERNELS, ids=kernels.kernel_id)
def test_objdump_shows_source_lines_inside_kmain(kernel_image, path):
    r = run([tool("objdump"), "-d", "-l", str(kernel_image(path, "native"))])
    assert r.returncode == 0, r.stderr
    m = re.search(r"^[0-9a-f]+ <kmain>:\n(.*?)(?:\n\n|\Z)", r.stdout, re.M | re.S)
    assert m, "no <kmain> in the disassembly"
    rows = re.findall(r"^(\S+\.pvk):(\d+)", m.group(1), re.M)
    assert rows, "no file:line rows inside <kmain>:\n" + m.group(1)[:2000]
    first, last = kmain_line(path), len(path.read_text().splitlines())
    for file, line in rows:
        assert Path(file).name == path.name and first <= int(line) <= last, (file, line)


def test_the_shared_conformance_kernels_are_among_those_checked():
    if not (SHARED / "conformance").is_dir():
        pytest.skip(f"{SHARED / 'conformance'} is absent (the shared folder sits beside the repository)")
    names = {kernels.kernel_id(p) for p in KERNELS}
    assert {f"shared/{p.stem}" for p in kernels.conformance_kernels()} <= names
    assert any(n.startswith("shared/") for n in names)


# -- the command line ----------------------------------------------------------------------------

def no_traceback(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr + r.stdout, r.stderr[-3000:]


def test_pvtool_help_lists_the_commands():
    r = pvtool("--help")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("usage: pvtool") and "build" in r.stdout and "run" in r.stdout


def test_pvtool_build_help_describes_its_options():
    r = pvtool("build", "--help")
    assert r.returncode == 0, r.stderr
    assert "usage: pvtool build" in r.stdout and "--target" in r.stdout and "-o" in r.stdout


def test_python_m_pvtool_alone_prints_usage():
    r = pvtool()
    no_traceback(r)
    assert r.returncode in (0, 2) and "usage: pvtool" in r.stdout + r.stderr


def test_the_installed_console_script_runs():
    r = run([tool("pvtool"), "--help"])
    assert r.returncode == 0 and r.stdout.startswith("usage: pvtool"), r.stderr


def test_pvtool_build_writes_an_elf_image(tmp_path: Path):
    src = tmp_path / "k.pvk"
    src.write_text("fn kmain() -> u64 { return 7; }\n")
    r = pvtool("build", str(src), "-o", str(tmp_path / "k.elf"), "--target", "native")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "k.elf").read_bytes()[:4] == b"\x7fELF"


def junk() -> bytes:
    rng = random.Random(6)
    return b"\x7fELF\x02\x01\x01\x00" + bytes(rng.randrange(256) for _ in range(4000))


def first_bad_byte(data: bytes) -> tuple[int, int]:
    """Line and column (in characters, from 1) of the first byte that is not UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[:e.start].decode("utf-8")
        return before.count("\n") + 1, len(before) - before.rfind("\n")
    raise AssertionError("the data is valid UTF-8")


KMAIN = b"fn kmain() -> u64 {\n"
BAD_INPUTS = {
    # name: (source bytes, the line:col the error must point at, a word of its message)
    "binary-junk": (junk(), first_bad_byte(junk()), "UTF-8"),
    "non-utf8": (KMAIN + b"    return 0; // caf\xe9\n}\n", (2, 21), "UTF-8"),
    "nested-blocks": (KMAIN + b"{" * 5000 + b"}" * 5000 + b"\nreturn 0; }\n", (2, None), "nested too deeply"),
    "nested-parens": (KMAIN + b"return " + b"(" * 10000 + b"1" + b")" * 10000 + b"; }\n", (2, None),
                      "nested too deeply"),
    "missing-import": (b'import "no/such/file.pvk";\n' + KMAIN + b"return 0; }\n", (1, 1), "cannot read"),
    "ascii-junk": (b"fn kmain() -> u64 { return 0; }\n@#$%^\x01\x02\n", (2, 1), "unexpected"),
}


@pytest.mark.parametrize("name", [
    n for n in BAD_INPUTS if n != "nested-parens"])
def test_bad_source_gives_a_located_error_with_a_caret(tmp_path: Path, name: str):
    source, (line, col), word = BAD_INPUTS[name]
    path = tmp_path / f"{name}.pvk"
    path.write_bytes(source)
    r = pvtool("build", str(path), "-o", str(tmp_path / "out.elf"))
    no_traceback(r)
    assert r.returncode == 1, f"exit status {r.returncode}; stderr: {r.stderr[:500]}"
    first, *rest = r.stderr.splitlines()
    m = re.match(rf"^{re.escape(str(path))}:(\d+):(\d+): error: (.+)$", first)
    assert m, first[:300]
    assert int(m.group(1)) == line and (col is None or int(m.group(2)) == col), first[:300]
    assert word in m.group(3), first
    caret = [s for s in rest if s.strip() == "^"]
    assert len(caret) == 1 and len(caret[0]) == int(m.group(2)), rest[-1:]
    assert not (tmp_path / "out.elf").exists()


def test_deep_parentheses_only_group(tmp_path: Path):
    """docs §10: parentheses add no nesting level, so 10,000 of them compile."""
    path = tmp_path / "parens.pvk"
    path.write_bytes(BAD_INPUTS["nested-parens"][0])
    r = pvtool("build", str(path), "-o", str(tmp_path / "out.elf"))
    no_traceback(r)
    assert r.returncode == 0 and (tmp_path / "out.elf").exists(), r.stderr[:300]


def test_an_empty_file_has_no_kmain_at_1_1(tmp_path: Path):
    """docs §10: a missing kmain is reported at 1:1 of the main file."""
    path = tmp_path / "empty.pvk"
    path.write_bytes(b"")
    r = pvtool("build", str(path))
    no_traceback(r)
    assert r.returncode == 1
    assert r.stderr.splitlines() == [f"{path}:1:1: error: the program has no 'fn kmain() -> u64'", "", "^"]


def test_a_missing_source_file_is_a_one_line_error(tmp_path: Path):
    r = pvtool("build", str(tmp_path / "absent.pvk"))
    no_traceback(r)
    assert r.returncode in (1, 2) and len(r.stderr.splitlines()) == 1 and "absent.pvk" in r.stderr


# -- the compile-speed benchmark ------------------------------------------------------------------

def test_compile_speed_benchmark_runs_on_a_small_kernel(tmp_path: Path):
    keep = tmp_path / "bench.pvk"
    r = run([sys.executable, str(ROOT / "bench" / "compile_speed.py"), "--lines", "500", "--json",
             "--keep", str(keep)])
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads(r.stdout)
    assert report["lines"] == len(keep.read_text().splitlines()) >= 500
    for target in TARGETS:
        stages = report["targets"][target]["stages"]
        assert set(stages) >= {"parse", "typecheck", "lower", "codegen", "link+elf"}
        assert ("paravirt" in stages) == (target == "pv")
        assert all(s["seconds"] > 0 and s["lines_per_second"] > 0 for s in stages.values())
        assert report["targets"][target]["image_bytes"] > 0


def test_compile_speed_once_runs_the_stages_asked_for(tmp_path: Path, monkeypatch):
    """--once is the run instructions are counted on: through elf it makes the image the
    driver makes (the same size), before elf none, and it leaves no files behind."""
    def once(*args: str) -> str:
        r = run([sys.executable, str(ROOT / "bench" / "compile_speed.py"), "--lines", "300", "--once", "pv",
                 *args])
        assert r.returncode == 0, r.stderr[-3000:]
        return r.stdout.strip()

    monkeypatch.setenv("TMPDIR", str(tmp_path))         # where the kernel is written
    driven = once("--upto", "driver")
    assert driven.startswith("compile_speed: pv up to driver: image ") and not driven.endswith(" 0 bytes")
    assert once("--upto", "elf") == driven.replace("up to driver", "up to elf")
    assert once("--upto", "codegen") == "compile_speed: pv up to codegen: image 0 bytes"
    assert list(tmp_path.iterdir()) == []

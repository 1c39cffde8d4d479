"""`pvtool diff`: site matching, the side-by-side view, the summary, the CLI.

Two parts: hand-made native/PV image pairs (gcc plus a `.pv.sites` section
added with objcopy) pin down the view on its own; then every conformance
kernel is built both ways with the compiler and every site of the native
build must appear in the diff with what it became.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
from collections import Counter
from pathlib import Path

import pytest

from pvtool import driver
from elftools.elf.elffile import ELFFile

from pvimage import abi, elfread as elfinfo
from pvtool.cli import main
from pvtool.tools.diffview import diff_images, match_sites, outcome, render, to_json
from pvtool.intrinsics import OP_NAMES, OP_NUMBERS

SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance"
GCC, OBJCOPY = shutil.which("gcc"), shutil.which("objcopy")
needs_tools = pytest.mark.skipif(GCC is None or OBJCOPY is None, reason="gcc and objcopy are needed")

NOTES = """__asm__(".pushsection .note.pvtool, \\"a\\", @note\\n.balign 4\\n"
        ".long 7, 4, 2\\n.asciz \\"PVTool\\"\\n.balign 4\\n.long MODE\\n" EXTRA ".popsection");
"""

NATIVE_C = NOTES.replace("MODE", "0").replace("EXTRA", '""') + """
__attribute__((noipa)) unsigned kmain(unsigned short port) {
    unsigned char v;
    __asm__ volatile("n1: cli\\nn1e:");
    __asm__ volatile("n2: outb %%al, $0x80\\nn2e:" :: "a"(1));
    __asm__ volatile("n3: inb %%dx, %%al\\nn3e:" : "=a"(v) : "d"(port));
    return v + 1;
}
void _start(void) {
    kmain(0x60);
    for (;;) __asm__ volatile("n4: hlt\\nn4e:");
}
"""

PV_C = NOTES.replace("MODE", "1").replace(
    "EXTRA", '".long 7, 8, 4\\n.asciz \\"PVTool\\"\\n.balign 4\\n.quad __hypercall_page\\n"') + """
__asm__(".pushsection .text.hc, \\"ax\\"\\n.balign 4096\\n.globl __hypercall_page\\n"
        ".type __hypercall_page, @function\\n__hypercall_page: .fill 4096, 1, 0xcc\\n"
        ".size __hypercall_page, 4096\\n.popsection");
__attribute__((noipa)) void flush_queue(void) { __asm__ volatile("" ::: "memory"); }
__attribute__((noipa)) unsigned kmain(unsigned short port) {
    unsigned char v;
    __asm__ volatile("p1: movb $1, 0x2000\\np1e:");
    __asm__ volatile("p2: movl $12, 0x2200\\n movl $1, 0x2100\\np2e:");
    __asm__ volatile("p3: movzwl %%dx, %%edi\\n call __hypercall_page+352\\np3e:"   /* io_in */
                     : "=a"(v) : "d"(port) : "rdi", "rcx", "r11");
    flush_queue();
    return v + 1;
}
void _start(void) {
    kmain(0x60);
    for (;;) {}
}
"""

# Ordinary code, the same in both builds: long enough to fold in the view.
COMMON = """
__attribute__((noipa)) unsigned long checksum(const unsigned char *p, unsigned long n) {
    unsigned long a = 1, b = 0;
    for (unsigned long i = 0; i < n; i++) { a = (a + p[i]) % 65521; b = (b + a) % 65521; }
    return (b << 16) | a;
}
"""
NATIVE_C += COMMON
PV_C += COMMON

FILE = "kern.pvk"
NATIVE_SITES = [("n1", "cli", FILE, 10, ""), ("n2", "outb", FILE, 11, ""),
                ("n3", "inb", FILE, 12, ""), ("n4", "hlt", "", 0, "")]
PV_SITES = [("p1", "cli", FILE, 10, "shared-page store: upcall_mask = 1 (no exit)"),
            ("p2", "outb", FILE, 11, "multicall queue entry: io_out (batched)"),
            ("p3", "inb", FILE, 12, "hypercall io_in")]


def symbols(path: Path) -> dict[str, int]:
    elf = ELFFile(io.BytesIO(path.read_bytes()))
    return {s.name: s.entry.st_value for s in elf.get_section_by_name(".symtab").iter_symbols()}


def kind_of(becomes: str) -> int:
    """The site kind these hand-made tables mean by their descriptions."""
    if "batched" in becomes:
        return abi.SITE_BATCHED
    return abi.SITE_HYPERCALL if becomes.startswith("hypercall") else abi.SITE_NO_EXIT


def build(tmp: Path, name: str, source: str, sites, rewritten: bool) -> Path:
    src, raw, out = tmp / f"{name}.c", tmp / f"{name}.raw", tmp / f"{name}.elf"
    src.write_text(source)
    subprocess.run([GCC, "-O2", "-ffreestanding", "-nostdlib", "-static", "-no-pie", "-o", str(raw), str(src)],
                   check=True, capture_output=True)
    sym = symbols(raw)
    table = [abi.Site(sym[label], sym[label + "e"] - sym[label], OP_NUMBERS[op],
                      kind_of(becomes) if rewritten else abi.SITE_NATIVE, file, line, becomes)
             for label, op, file, line, becomes in sites]
    (tmp / f"{name}.sites").write_bytes(abi.pack_sites(table))
    subprocess.run([OBJCOPY, "--add-section", f".pv.sites={tmp / f'{name}.sites'}", str(raw), str(out)],
                   check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    if GCC is None or OBJCOPY is None:
        pytest.skip("gcc and objcopy are needed")
    tmp = tmp_path_factory.mktemp("diff")
    return build(tmp, "k.native", NATIVE_C, NATIVE_SITES, False), build(tmp, "k.pv", PV_C, PV_SITES, True)


def run_diff(capsys, *args) -> tuple[int, str, str]:
    status = main(["diff", *map(str, args)])
    cap = capsys.readouterr()
    return status, cap.out, cap.err


# -- the view on hand-made images ---------------------------------------------------

def test_outcomes():
    site = lambda kind: abi.Site(0x1000, 1, OP_NUMBERS["cli"], kind, "f.pvk", 1, "x")
    assert outcome(site(abi.SITE_NO_EXIT)) == "no-exit"
    assert outcome(site(abi.SITE_BATCHED)) == "batched"
    assert outcome(site(abi.SITE_HYPERCALL)) == "hypercall"


def test_match_sites_in_order_by_op_and_line():
    s = lambda op, line, rw: abi.Site(0x1000 + line, 1, OP_NUMBERS[op], abi.SITE_NO_EXIT if rw else abi.SITE_NATIVE,
                                      "f.pvk", line, "x" if rw else "")
    pairs = match_sites([s("cli", 1, False), s("sti", 2, False), s("cli", 3, False)],
                        [s("cli", 1, True), s("hlt", 5, True), s("cli", 3, True)])
    assert [(p.op, p.line, p.native is not None, p.pv is not None) for p in pairs] == [
        ("cli", 1, True, True), ("sti", 2, True, False), ("hlt", 5, False, True), ("cli", 3, True, True)]


@needs_tools
def test_sites_paired_with_what_they_became(pair):
    native, pv = (elfinfo.load_file(p) for p in pair)
    d = to_json(diff_images(native, pv))
    fns = {f["name"]: f for f in d["functions"]}
    assert "__hypercall_page" not in fns           # the hypervisor's page is not listed
    assert fns["flush_queue"]["native"] is None and fns["flush_queue"]["pv"]["size"] > 0
    kmain = fns["kmain"]["sites"]
    assert [(s["op"], s["line"], s["native"]["asm"], s["pv"]["becomes"]) for s in kmain] == [
        ("cli", 10, "cli", PV_SITES[0][4]),
        ("outb", 11, "out 0x80, al", PV_SITES[1][4]),
        ("inb", 12, "in al, dx", PV_SITES[2][4])]
    assert kmain[0]["pv"]["asm"] == "mov byte ptr [0x2000], 1"
    assert kmain[2]["pv"]["asm"].startswith("movzx edi, dx; call")
    hlt = fns["_start"]["sites"]
    assert [(s["op"], s["file"], s["native"]["asm"], s["pv"]) for s in hlt] == [("hlt", "", "hlt", None)]


@needs_tools
def test_summary_counts(pair):
    native, pv = (elfinfo.load_file(p) for p in pair)
    s = to_json(diff_images(native, pv))["summary"]
    assert s["ops"]["cli"] == {"native": 1, "boot": 0, "pv": 1, "exits_avoided": 1, "batched": 0, "hypercalls": 0}
    assert s["ops"]["outb"]["batched"] == 1 and s["ops"]["inb"]["hypercalls"] == 1
    assert s["ops"]["hlt"] == {"native": 1, "boot": 1, "pv": 0, "exits_avoided": 0, "batched": 0, "hypercalls": 0}
    assert (s["native_sites"], s["pv_sites"], s["exits_avoided"], s["batched"], s["hypercalls"]) == (4, 3, 1, 1, 1)
    assert s["native_boot_sites"] == 1
    text = lambda info: sum(len(g.data) for g in info.executable)
    size = s["code_size"]
    assert (size["native"], size["pv"]) == (text(native), text(pv) - abi.PAGE_SIZE)
    listed = lambda info: sum(f.size for f in info.functions if f.name != "__hypercall_page")
    assert (size["native_functions"], size["pv_functions"]) == (listed(native), listed(pv))


@needs_tools
def test_text_view(pair, capsys):
    status, out, err = run_diff(capsys, *pair, "--color", "never")
    assert status == 0 and err == "" and "\x1b[" not in out
    assert "-- cli at kern.pvk:10 -> shared-page store: upcall_mask = 1 (no exit)" in out
    assert "-- inb at kern.pvk:12 -> hypercall io_in" in out
    assert "-- hlt at boot code: no matching PV site" in out
    site_row = next(l for l in out.splitlines() if "  cli" in l and "mov byte ptr [0x2000], 1" in l)
    assert "*" in site_row                      # native and PV instruction on one row
    assert "== kmain  native 0x" in out and "== flush_queue  native absent | pv 0x" in out
    assert ("exits avoided: 1 of 3 source sites no longer exit; "
            "1 batched into multicalls; 1 remain hypercalls") in out
    assert "all functions" in out and "text (no hypercall page)" in out
    assert "call 0x402160 <hypercall io_in>" in out


@needs_tools
def test_colour_on_request_only(pair, capsys):
    assert "\x1b[" in run_diff(capsys, *pair, "--color", "always")[1]
    assert "\x1b[" not in run_diff(capsys, *pair)[1]        # auto: captured output is not a terminal


@needs_tools
def test_identical_runs_fold(pair, capsys):
    native, pv = (elfinfo.load_file(p) for p in pair)
    d = diff_images(native, native)
    short, full = render(d), render(d, full=True)
    assert "identical instruction" in short and "identical instruction" not in full
    assert len(full.splitlines()) > len(short.splitlines())


@needs_tools
def test_json_cli(pair, capsys):
    status, out, _ = run_diff(capsys, *pair, "--json")
    d = json.loads(out)
    assert status == 0 and d["native"] == str(pair[0]) and d["pv"] == str(pair[1])
    assert {"functions", "summary"} <= set(d)
    for f in d["functions"]:
        for s in f["sites"]:
            assert set(s) == {"op", "line", "file", "native", "pv"}
            if s["pv"]:
                assert {"address", "length", "asm", "becomes"} <= set(s["pv"])


@needs_tools
def test_bad_inputs_exit_2(pair, capsys, tmp_path):
    junk = tmp_path / "junk.elf"
    junk.write_bytes(b"nonsense" * 10)
    cases = [(pair[1], pair[0]), (pair[0], junk), (pair[0], tmp_path / "missing.elf"), (pair[0], pair[1], pair[1]),
             (pair[0],), (tmp_path / "missing.pvk",)]
    for args in cases:
        status, out, err = run_diff(capsys, *args)
        assert status == 2 and out == "" and err.count("\n") == 1, (args, err)
    assert "native image first" in run_diff(capsys, pair[1], pair[0])[2]


# -- the conformance kernels, built both ways -------------------------------------------

KERNELS = sorted(CONFORMANCE.glob("*.pvk")) if CONFORMANCE.is_dir() else []


@pytest.mark.skipif(not KERNELS, reason=f"no conformance kernels at {CONFORMANCE}")
@pytest.mark.parametrize("kernel", KERNELS, ids=[k.stem for k in KERNELS])
def test_conformance_diff(kernel, capsys):
    status, out, err = run_diff(capsys, kernel, "--json")
    assert status == 0, err
    d = json.loads(out)
    native = elfinfo.load(driver.compile_file(str(kernel), "native"))
    pv = elfinfo.load(driver.compile_file(str(kernel), "pv"))
    nsites = [s for s in native.sites if not s.rewritten]
    psites = [s for s in pv.sites if s.rewritten]
    shown = [s for f in d["functions"] for s in f["sites"]]
    by_native = {s["native"]["address"]: s for s in shown if s["native"]}
    by_pv = {s["pv"]["address"]: s for s in shown if s["pv"]}
    # Every native site is in the diff; every one from the source became a PV site.
    assert sorted(by_native) == sorted(s.address for s in nsites)
    becomes = {s.address: s.becomes for s in psites}
    for s in nsites:
        row = by_native[s.address]
        assert row["op"] == OP_NAMES[s.op] and row["line"] == s.line
        if s.file:
            assert row["pv"] is not None, f"{row['op']} at {s.file}:{s.line} has no PV site"
            assert row["pv"]["becomes"] == becomes[row["pv"]["address"]] != ""
            assert row["native"]["asm"]
    assert sorted(by_pv) == sorted(becomes)
    # The summary is the site tables, counted.
    summary = d["summary"]
    assert {op: c["native"] for op, c in summary["ops"].items() if c["native"]} == \
        dict(Counter(OP_NAMES[s.op] for s in nsites))
    assert {op: c["pv"] for op, c in summary["ops"].items() if c["pv"]} == dict(Counter(OP_NAMES[s.op] for s in psites))
    kinds = Counter(outcome(s) for s in psites)
    assert (summary["exits_avoided"], summary["batched"], summary["hypercalls"]) == \
        (kinds["no-exit"], kinds["batched"], kinds["hypercall"])
    assert summary["native_sites"] == len(nsites) and summary["pv_sites"] == len(psites)
    assert summary["native_boot_sites"] == sum(1 for s in nsites if not s.file)


def test_compile_error_exit_1(tmp_path, capsys):
    bad = tmp_path / "bad.pvk"
    bad.write_text("fn kmain() -> u64 {\n    return undefined_name;\n}\n")
    status, out, err = run_diff(capsys, bad)
    assert status == 1 and out == "" and "undefined_name" in err and "Traceback" not in err

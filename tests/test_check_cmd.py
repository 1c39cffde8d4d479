"""`pvtool check`: exit codes, what the report names, the --json shape."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ckit.build import build
from pvtool import driver
from pvtool.cli import main

GCC = shutil.which("gcc")
pytestmark = pytest.mark.skipif(GCC is None, reason="gcc is not installed")
SHARED = Path(__file__).resolve().parents[2] / "shared"
CONFORMANCE = SHARED / "conformance"

NATIVE_C = """\
static inline void outb(unsigned short port, unsigned char v) {
    __asm__ volatile("outb %0, %1" :: "a"(v), "Nd"(port));
}
__attribute__((noipa)) void mask_irqs(void) {
    __asm__ volatile("cli");
}
void _start(void) {
    mask_irqs();
    outb(0xf4, 0);
    for (;;) __asm__ volatile("hlt");
}
"""

# A PV image as a guest writer might make it by hand without the kit: PVTool
# notes, a hypercall page full of placeholder bytes (here `cli`, never
# validated: the hypervisor writes the page), and code that calls into the
# page through an unmasked register: the code rules refuse that call.
PV_C = """\
__asm__(".pushsection .note.pvtool, \\"a\\", @note\\n.balign 4\\n"
        ".long 7, 4, 2\\n.asciz \\"PVTool\\"\\n.balign 4\\n.long 1\\n"
        ".long 7, 8, 4\\n.asciz \\"PVTool\\"\\n.balign 4\\n.quad __hypercall_page\\n"
        ".popsection");
__asm__(".pushsection .text.hc, \\"ax\\"\\n.balign 4096\\n.globl __hypercall_page\\n"
        ".type __hypercall_page, @function\\n__hypercall_page: .fill 4096, 1, 0xfa\\n"
        ".size __hypercall_page, 4096\\n.popsection");
extern char __hypercall_page[];
void _start(void) {
    __asm__ volatile("xor %%edi, %%edi\\n call *%0" :: "r"(__hypercall_page + 32) : "rdi", "rax", "rcx", "r11");
    for (;;) {}
}
"""

# 32-bit boot code, as QEMU's PVH entry runs it: the Xen note marks it.
PVH_C = """\
__asm__(".pushsection .text\\n.globl start32\\n.type start32, @function\\n.code32\\n"
        "start32: cli\\n ljmp $8, $0x401000\\n.code64\\n.size start32, .-start32\\n.popsection");
__asm__(".pushsection .note.xen, \\"a\\", @note\\n.balign 4\\n.long 4, 4, 18\\n"
        ".asciz \\"Xen\\"\\n.balign 4\\n.long start32\\n.popsection");
void _start(void) { for (;;) {} }
"""


def gcc(tmp: Path, name: str, source: str) -> Path:
    src, out = tmp / f"{name}.c", tmp / f"{name}.elf"
    src.write_text(source)
    subprocess.run([GCC, "-g", "-O2", "-ffreestanding", "-nostdlib", "-static", "-no-pie",
                    "-o", str(out), str(src)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("check")
    out = {name: gcc(tmp, name, src) for name, src in
           (("native", NATIVE_C), ("pv", PV_C), ("pvh", PVH_C),
            ("clean", "int f(int x) { return x * 7; }\nvoid _start(void) { for (;;) {} }\n"))}
    out["junk"] = tmp / "junk.elf"
    out["junk"].write_bytes(b"\x7fELF" + b"\xff" * 200)
    out["truncated"] = tmp / "truncated.elf"
    out["truncated"].write_bytes(out["native"].read_bytes()[:3000])
    out["text"] = tmp / "notes.txt"
    out["text"].write_text("hello\n")
    return out


def check(capsys, *args: str) -> tuple[int, str, str]:
    status = main(["check", *map(str, args)])
    cap = capsys.readouterr()
    return status, cap.out, cap.err


def test_native_image_reports_each_instruction(images, capsys):
    status, out, err = check(capsys, images["native"])
    assert status == 1 and err == ""
    lines = out.splitlines()
    assert "native" in lines[0] and "3 sensitive instructions" in lines[0]
    cli = next(l for l in lines if " cli " in f"{l} ")
    assert "mask_irqs+0x0" in cli and "privileged" in cli and "native.c:5" in cli
    outb = next(l for l in lines if "out 0xf4, al" in l)
    assert "_start+" in outb and "native.c:2" in outb   # the inlined helper's line
    assert any("hlt" in l and "native.c:10" in l for l in lines)


def test_pv_image_built_with_the_kit_passes(capsys):
    image = build("hello_pv")
    status, out, _ = check(capsys, image)
    assert status == 0
    assert out.strip() == f"{image}: paravirtual, obeys the code rules (no reachable sensitive instruction)"


def test_pv_image_lists_each_rule_violation(capsys):
    image = build("pv_hostile", ["-DWITH_CLI"])
    status, out, err = check(capsys, image)
    assert status == 1 and err == ""
    lines = out.splitlines()
    assert lines[0] == f"{image}: paravirtual, 1 code-rule violation"
    assert lines[1].startswith("  rule R4 (forbidden instruction): 'cli' at 0x")
    assert "sensitive+0x0 (pv_hostile.c:" in lines[1]


def test_hand_made_pv_image_breaks_the_rules_but_its_hypercall_page_is_not_read(images, capsys):
    status, out, _ = check(capsys, images["pv"], "--json")
    report = json.loads(out)
    assert status == 1 and report["mode"] == "pv" and report["passed"] is False
    assert "R6" in {f["rule"] for f in report["findings"]}           # the unmasked call
    assert not any("cli" in f["message"] for f in report["findings"])   # the page is not read
    assert all(set(f) == {"rule", "address", "message"} for f in report["findings"])
    assert "is not preceded by 'and" in report["findings"][0]["message"]


def test_clean_native_image_is_not_a_pass(images, capsys):
    status, out, _ = check(capsys, images["clean"])
    assert status == 1 and "no sensitive instruction found, but not a paravirtual image" in out


def test_pvh_entry_decoded_as_32_bit(images, capsys):
    status, out, _ = check(capsys, images["pvh"], "--json")
    report = json.loads(out)
    assert status == 1
    assert [(f["mnemonic"], f["function"]) for f in report["findings"]] == [("cli", "start32"), ("ljmp", "start32")]


@pytest.mark.parametrize("name,words", [("junk", "bad ELF class"), ("truncated", "truncated"),
                                        ("text", "not an ELF file"), ("missing", "No such file")])
def test_unreadable_input_exit_2(images, capsys, name, words):
    path = images.get(name, Path("/nonexistent/kernel.elf"))
    status, out, err = check(capsys, path)
    assert status == 2 and out == ""
    assert err.count("\n") == 1 and words in err and str(path) in err


def test_json_shape(images, capsys):
    status, out, _ = check(capsys, images["native"], "--json")
    report = json.loads(out)
    assert status == 1
    assert report["image"] == str(images["native"]) and report["mode"] == "native" and report["passed"] is False
    keys = {"address", "size", "mnemonic", "operands", "category", "function", "file", "line"}
    assert len(report["findings"]) == 3 and all(keys <= set(f) for f in report["findings"])
    out_insn = next(f for f in report["findings"] if f["mnemonic"] == "out")
    assert out_insn["operands"] == "0xf4, al" and out_insn["size"] == 2 and out_insn["category"] == "privileged"
    assert Path(out_insn["file"]).name == "native.c" and out_insn["line"] == 2


def test_json_pass(capsys):
    image = build("hello_pv")
    status, out, _ = check(capsys, image, "--json")
    assert status == 0 and json.loads(out) == {"image": str(image), "mode": "pv", "passed": True, "findings": []}


def test_real_entry_point_no_traceback(images):
    r = subprocess.run([sys.executable, "-m", "pvtool", "check", str(images["junk"])],
                       capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.count("\n") == 1


def test_help_names_the_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["check", "--help"])
    assert "exit status" in capsys.readouterr().out


# -- our own builds of the conformance kernels -------------------------------------------

KERNELS = sorted(CONFORMANCE.glob("*.pvk")) if CONFORMANCE.is_dir() else []


@pytest.mark.skipif(not KERNELS, reason=f"no conformance kernels at {CONFORMANCE}")
@pytest.mark.parametrize("kernel", KERNELS, ids=[k.stem for k in KERNELS])
def test_conformance_builds(kernel, tmp_path, capsys):
    for target, want in (("pv", 0), ("native", 1)):
        image = tmp_path / f"{kernel.stem}.{target}.elf"
        image.write_bytes(driver.compile_file(str(kernel), target))
        status, out, _ = check(capsys, image, "--json")
        report = json.loads(out)
        assert (status, report["mode"]) == (want, target), report["findings"][:5]
        if target == "native":   # the exit path at least: boot code writes port 0xf4
            assert any(f["mnemonic"] == "out" for f in report["findings"])


def test_pv_guest_without_its_notes_is_named_as_such(tmp_path, capsys):
    image = tmp_path / "lost.elf"
    image.write_bytes(build("hello_pv").read_bytes().replace(b"PVTool\0\0", b"Other\0\0\0"))
    status, out, _ = check(capsys, image)
    assert status == 1 and "has a hypercall page: a PV guest whose notes are missing" in out.splitlines()[0]

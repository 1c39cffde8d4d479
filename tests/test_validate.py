"""The PV code rules R1-R7 (pvimage/validate.py) on images whose every byte the test chooses.

Each refused case names its rule; the hiding cases also show that a linear
sweep misses what they hide, so they are refused for the right reason.
"""
from __future__ import annotations

import time

import pytest

import pvasm
from pvimage import abi
from pvimage.elfread import load
from pvimage.sweep import sweep_image
from pvimage.validate import BUNDLE, RuleViolation, validate, violations

pytestmark = pytest.mark.skipif(not pvasm.have_binutils(), reason="GNU as and ld are needed")


def rules_broken(body: str) -> list[str]:
    return [v.rule for v in violations(load(pvasm.image(body)))]


def refused(body: str, rule: str) -> str:
    """The first violation's line for the image of `body`, which must name `rule`."""
    return refused_image(pvasm.image(body), rule)


def refused_image(data: bytes, rule: str) -> str:
    with pytest.raises(RuleViolation) as e:
        validate(load(data))
    line = str(e.value)
    assert line.startswith(f"rule {rule} (") and "\n" not in line, line
    return line


# -- a conforming image -------------------------------------------------------------------------

GOOD = """
    mov %rdi, %rax
    .balign 32, 0xcc
masked:
    pop %r11
    and $-32, %r11
    jmp *%r11
    .balign 32, 0xcc
    and $-32, %rax
    call *%rax
    jz masked
    loop masked
    jmp hypercall_page + 32 * 19
"""


def test_a_conforming_image_passes_with_its_instruction_starts():
    data = pvasm.image(GOOD)
    code = validate(load(data))
    case = pvasm.symbol(data, "case")
    assert {abi.LOAD_BASE, abi.LOAD_BASE + 5, case, case + 3, case + 32, case + 34} <= set(
        a for a in range(abi.LOAD_BASE, case + 128) if a in code.starts)
    assert case + 1 not in code.starts and case + 33 not in code.starts
    page = code.hypercall_page
    assert page == load(data).hypercall_page and all(a not in code.starts for a in range(page, page + 4096))
    assert code.starts.ranges == [(abi.LOAD_BASE, page)]
    assert code.resume_points == {page + 32 * nr + 7 for nr in range(abi.HC_COUNT) if nr != abi.HC_IRET}
    assert code.is_hypercall_entry(page + 32 * 19) and not code.is_hypercall_entry(page + 32 * abi.HC_COUNT)


# -- R3 bundles -----------------------------------------------------------------------------------

def test_an_instruction_crossing_a_bundle_end():
    line = refused(".fill 30, 1, 0x90\n mov $1, %eax", "R3")
    assert "'mov eax, 1'" in line and "crosses the bundle end" in line


def test_an_undecodable_byte():
    assert "undecodable byte 0x06" in refused(".byte 0x06", "R3")


def test_the_bundle_after_a_broken_one_is_decoded_from_its_start():
    # A crossing instruction, then a cli in the next bundle: both are found.
    assert rules_broken(".fill 30, 1, 0x90\n mov $1, %eax\n .balign 32, 0x90\n cli") == ["R3", "R4"]


# -- R4 forbidden instructions ----------------------------------------------------------------

@pytest.mark.parametrize("asm,words", [
    ("ret", "is a return"), (pvasm.hexbytes("c2 08 00"), "is a return"), (pvasm.hexbytes("f3 c3"), "is a return"),
    ("jmp *(%rax)", "through memory"), ("call *8(%rip)", "through memory"), ("jmp *(%rsp)", "through memory"),
    (pvasm.hexbytes("ff 2c 24"), "far"), (pvasm.hexbytes("ff 18"), "far"), ("xbegin 1f\n1:", "abort address"),
    ("cli", "sensitive"), ("mov %rax, %cr3", "control register"), ("mov %ds, %ax", "segment register"),
    ("pushf", "sensitive"), ("lret", "sensitive"), ("ljmp *(%rax)", "far"),
])
def test_forbidden_instructions(asm, words):
    assert words in refused(asm, "R4")


def test_classifying_by_mnemonic_agrees_with_the_sweep_on_every_instruction():
    # The validator decodes with detail only where a mnemonic may be sensitive; the sweep decodes
    # everything with detail.  Over every table case, operand case and a native kernel, they agree.
    import capstone
    from pvimage import validate as v
    from pvimage.sweep import classify, decode
    import test_sweep
    samples = [bytes.fromhex(c[1]) for c in test_sweep.CASES if c[3] == 64]
    samples += [bytes.fromhex(c[0]) for c in test_sweep.OPERAND_CASES] + [bytes.fromhex(c) for c in test_sweep.CLEAN]
    from pvtool import driver
    natives = [load(driver.compile_file(str(pvasm.ROOT / "kernels" / k), "native")) for k in ("machine.pvk", "mm.pvk")]
    checker = v._Validator(natives[0])
    light = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    streams = [(s, 0x1000) for s in samples] + [(seg.data, seg.address) for n in natives for seg in n.executable]
    seen = 0
    for code, base in streams:
        for insn in decode(code, base):
            address, size, mnemonic, operands = next(light.disasm_lite(bytes(insn.bytes), insn.address))
            name = mnemonic.rsplit(" ", 1)[-1]
            fast = checker._sensitive(name, mnemonic, operands, code[address - base:address - base + size], address)
            assert fast == classify(insn), f"{mnemonic} {operands}"
            seen += 1
    assert seen > 1500


# -- R5 direct branches, and the hiding tricks they stop ---------------------------------------

HIDDEN = {   # a sensitive instruction, as bytes
    "wrmsr": "0f 30", "mov cr3": "0f 22 d8", "mov cr0": "0f 22 c0", "cli": "fa", "sti": "fb", "popf": "9d",
    "invlpg": "0f 01 38", "swapgs": "0f 01 f8", "xsetbv": "0f 01 d1", "mov dr7": "0f 23 f8", "wbinvd": "0f 09",
    "rdmsr": "0f 32",
}
HIDERS = {   # an innocent instruction whose immediate or displacement holds it: (prefix, room)
    "mov eax, imm32": ("b8", 4), "mov rax, imm64": ("48 b8", 8), "nop disp32": ("0f 1f 80", 4),
    "66 nop disp32": ("66 0f 1f 80", 4), "67 lea disp32": ("67 8d 80", 4),
}


@pytest.mark.parametrize("hider", HIDERS)
@pytest.mark.parametrize("insn", HIDDEN)
def test_a_jump_into_the_middle_of_an_instruction(insn, hider):
    prefix, room = HIDERS[hider]
    hidden = bytes.fromhex(HIDDEN[insn]).ljust(room, b"\x90")
    body = f"jmp hidden\n {pvasm.hexbytes(prefix)}\nhidden: {pvasm.hexbytes(hidden.hex())}"
    data = pvasm.image(body)
    assert not sweep_image(load(data)), "the linear sweep should not see the hidden instruction"
    line = refused(body, "R5")
    assert f"targets {pvasm.symbol(data, 'hidden'):#x}: not an instruction start" in line


def test_a_jump_to_the_jmp_of_a_masked_pair():
    line = refused("jmp 1f\n .balign 32, 0xcc\n and $-32, %rax\n1: jmp *%rax", "R5")
    assert "the jmp/call of a masked pair" in line


@pytest.mark.parametrize("target", ["hypercall_page + 7", f"hypercall_page + 32 * {abi.HC_COUNT}",
                                    "hypercall_page + 4095"])
def test_a_branch_into_the_hypercall_page_must_hit_an_entry(target):
    assert "not a hypercall entry" in refused(f"call {target}", "R5")


def test_a_branch_outside_the_code():
    assert "not an instruction start" in refused("jmp 0x200000", "R5")


# -- R6 masked indirect branches ------------------------------------------------------------------

@pytest.mark.parametrize("asm,words", [
    ("jmp *%rax", "not preceded by 'and rax, -32'"),
    ("call *%r11", "not preceded by 'and r11, -32'"),
    ("and $-32, %rbx\n jmp *%rax", "not preceded by 'and rax, -32'"),
    ("and $-16, %rax\n jmp *%rax", "not preceded by"),
    ("and $-32, %rax\n nop\n jmp *%rax", "not preceded by"),
    (".fill 28, 1, 0x90\n and $-32, %rax\n jmp *%rax", "not preceded by"),      # the pair split by a bundle end
    (f"and $-32, %rax\n {pvasm.hexbytes('66 ff e0')}", "not encoded as plain 'jmp r64'"),
    (f"and $-32, %rax\n {pvasm.hexbytes('40 ff e0')}", "not encoded as plain 'jmp r64'"),
])
def test_unmasked_indirect_branches(asm, words):
    assert words in refused(asm, "R6")


# -- R1, R2, R7 ----------------------------------------------------------------------------------------

def test_writable_text_is_refused_before_any_decoding():
    data = pvasm.patch_phdr(pvasm.image("cli"), 0, flags=7)
    line = refused_image(data, "R1")
    assert "writable and executable; PV images need W^X" in line
    assert [v.rule for v in violations(load(data))] == ["R1"]


def test_entry_must_be_a_bundle_start():
    data = pvasm.image("nop")
    for entry in (abi.LOAD_BASE + 5, abi.LOAD_BASE + 1, 0x200000):
        line = refused_image(pvasm.patch(data, 24, "<Q", entry), "R7")
        assert f"entry point {entry:#x}" in line


def test_hypercall_page_note_rules():
    data = pvasm.image("nop")
    page = load(data).hypercall_page
    note = data.find(page.to_bytes(8, "little"))
    assert "not page-aligned" in refused_image(pvasm.patch(data, note, "<Q", page + 32), "R2")
    assert "not inside an executable segment" in refused_image(pvasm.patch(data, note, "<Q", page + 4096), "R2")


def test_violations_lists_every_broken_rule():
    assert rules_broken("cli\n jmp *%rax\n ret\n jmp hidden\n .byte 0xb8\nhidden: .byte 0xfa, 0x90, 0x90, 0x90") == [
        "R4", "R6", "R4", "R5"]


# -- speed -----------------------------------------------------------------------------------------

def test_200_kb_of_text_validates_in_well_under_a_second():
    # 6,400 bundles of ordinary code: moves, arithmetic, compares, loads, stores, branches.  Alone on
    # a quiet machine this takes about 0.2 s; measured against capstone's bare decoding of the same
    # bytes (a ratio, so a loaded machine does not fail it), the rules cost a few decodes' worth.
    import capstone
    bundle = ("1: mov 8(%rsp), %rax\n add %rbx, %rax\n cmp $5, %rax\n jne 1b\n mov %rax, 16(%rsp)\n"
              " lea 0x10(%rax,%rbx,4), %rcx\n imul %rcx, %rdx\n .balign 32, 0x90\n")
    info = load(pvasm.image(bundle * 6400))
    text = info.executable[0]
    assert text.memsz > 200_000
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    t0 = time.perf_counter()
    decoded = sum(1 for _ in md.disasm_lite(text.data, text.address))
    t1 = time.perf_counter()
    validate(info)
    t2 = time.perf_counter()
    assert decoded > 50_000
    assert t2 - t1 < 6 * (t1 - t0), f"validate {t2 - t1:.3f} s, bare decoding {t1 - t0:.3f} s"
